#!/usr/bin/env bash
# Installs everything the tests need into .venv and runs the whole suite on the CPU.
# torch comes first, pinned to a CPU build: an unpinned torch pulled in by a later requirement would
# fetch a multi-GB CUDA build. Triton kernels run through Triton's interpreter (TRITON_INTERPRET=1).
set -euo pipefail
cd "$(dirname "$0")/.."
# The terminal smoke test drives the installed app in a real terminal through tmux.
if ! command -v tmux >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq >/dev/null && apt-get install -y -qq tmux >/dev/null
  else
    echo "tests/run.sh: tmux is missing (the terminal smoke test needs it); install it and run again" >&2
    exit 1
  fi
fi
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e '.[dev]'
ruff check --quiet . && ruff format --check --quiet .
export TRITON_INTERPRET=1
# `pytest`, not `python -m pytest`: the latter puts this folder first on sys.path, where the top-level
# `kernels/` folder would hide the `kernels` package that transformers (a test oracle) imports.
exec pytest -q "$@"
