#!/usr/bin/env bash
# Builds the sdist and wheel, installs the wheel (with its dependencies) into a fresh virtualenv and
# runs `kimi-desk bench cpu --help` and `kimi-desk --version` from it.
# Usage: packaging/build_and_check.sh [WORK_DIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d)}
python3 -m build --sdist --wheel --outdir "$work/dist" "$root" >"$work/build.log" 2>&1 || {
  tail -n 20 "$work/build.log" >&2; exit 1; }
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --upgrade pip
# The CPU build of torch first, as the test setup does, so no CUDA build is pulled in.
"$work/venv/bin/python" -m pip install --quiet torch==2.13.0
"$work/venv/bin/python" -m pip install --quiet "$work"/dist/*.whl
cd "$work"
# The measurements ship too: `bench cpu` imports kimi_desk.bench and its harness from the wheel.
"$work/venv/bin/kimi-desk" bench cpu --help >/dev/null
"$work/venv/bin/kimi-desk" --version
