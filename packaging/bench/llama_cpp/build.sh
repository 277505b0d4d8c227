#!/usr/bin/env bash
# Builds llama.cpp (the copy vendored by the llama-cpp-python sdist, which runs Kimi Linear) as a same-run
# reference for kimi-desk's benchmarks: llama-bench, llama-quantize, llama-perplexity, llama-tokenize and
# our own logits dumper (logits.cpp, beside this script), into OUT_DIR.
#
# Usage: build.sh [--cuda] [--jobs N] [--source SDIST_OR_TARBALL] OUT_DIR
#   --cuda     build the CUDA backend for the H200 (-DGGML_CUDA=ON, sm_90, ninja); default CPU only
#   --source   a llama_cpp_python-*.tar.gz sdist or a tarball of a llama.cpp tree (a stripped copy of
#              the sdist's vendor/llama.cpp will do); default: `pip download` of the sdist below
# Layout of OUT_DIR: src/llama.cpp (the tree; convert.py runs its convert_hf_to_gguf.py), build/
# (cmake), bin/ (links to the binaries), SOURCE (sdist, llama.cpp commit), BUILD_INFO (+ cmake flags),
# BUILD_TIMES (one line per run).
# Idempotent: a second run reuses the unpacked tree and the cmake build (ninja rebuilds nothing).
#
# Time, 2026-12-03. CPU build here (2 cores shared with other jobs, load average 6-7; Debian 12, gcc
# 12.2, cmake 3.25, ninja; 149 steps): 885 s wall (14.8 min), 9.0 min of user CPU; a repeat run 0-4 s.
# CUDA build on the H200 host (16 cores; nvcc 13.0, cmake 4.4, ninja 1.13 there): not timed from this
# worktree; llama-cpp-source.sh's header measured ~4.5 min for llama-bench + llama-quantize, which
# compile nearly everything (ggml-cuda's kernels dominate); the other targets add seconds: ~5 min.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36
here=$(cd "$(dirname "$0")" && pwd)
cuda=0; jobs=$(nproc); source_arg=""; out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cuda) cuda=1 ;;
    --jobs) jobs=$2; shift ;;
    --source) source_arg=$(realpath "$2"); shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    -*) echo "build.sh: unknown option $1" >&2; exit 2 ;;
    *) out=$1 ;;
  esac
  shift
done
[ -n "$out" ] || { echo "usage: build.sh [--cuda] [--jobs N] [--source TARBALL] OUT_DIR" >&2; exit 2; }
mkdir -p "$out"; out=$(realpath "$out")
start=$(date +%s)

# 1. The source tree, once.
tree="$out/src/llama.cpp"
if [ ! -f "$tree/src/models/kimi-linear.cpp" ]; then
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  if [ -z "$source_arg" ]; then
    # --no-binary for this one package only: its build dependencies may come as wheels (quick).
    python3 -m pip download -q --no-deps --no-binary llama-cpp-python \
      "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$tmp/dl"
    source_arg=$(ls "$tmp"/dl/llama_cpp_python-*.tar.gz)
  fi
  mkdir -p "$tmp/x"; tar xf "$source_arg" -C "$tmp/x"
  found=$(find "$tmp/x" -maxdepth 7 -type f -path '*/llama.cpp/src/models/kimi-linear.cpp' | head -1)
  [ -n "$found" ] || { echo "build.sh: no llama.cpp tree with src/models/kimi-linear.cpp in $source_arg" >&2; exit 1; }
  found_tree=$(dirname "$(dirname "$(dirname "$found")")")
  # The sdist keeps the submodule's git data, so its llama.cpp commit can be named (the stripped
  # tarball of llama-cpp-source.sh cannot: "unknown").
  commit=$(git -C "$found_tree" rev-parse HEAD 2>/dev/null || echo unknown)
  mkdir -p "$out/src"; rm -rf "$tree"
  mv "$found_tree" "$tree"
  printf 'source: %s\nllama.cpp commit: %s\n' "$(basename "$source_arg")" "$commit" > "$out/SOURCE"
fi
commit=$(sed -n 's/^llama.cpp commit: //p' "$out/SOURCE")

# 2. Configure (once per flavour) and build the tools we use.
build="$out/build"
flags=(-DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
       -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=ON "-DLLAMA_BUILD_COMMIT=${commit:-unknown}")
if [ "$cuda" = 1 ]; then
  flags+=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90)
fi
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
# A build of the other flavour is wiped; configuring an existing one again takes seconds.
if [ -f "$build/CMakeCache.txt" ] && ! grep -q "^GGML_CUDA:BOOL=$([ "$cuda" = 1 ] && echo ON || echo OFF)" "$build/CMakeCache.txt"; then
  rm -rf "$build"
fi
cmake -S "$tree" -B "$build" "${generator[@]}" "${flags[@]}" > "$out/cmake-configure.log"
cmake --build "$build" -j "$jobs" --target llama-bench llama-quantize llama-perplexity llama-tokenize llama

# 3. Our logits dumper, linked against the libllama just built (rpath: no LD_LIBRARY_PATH needed).
libdir="$build/bin"
if [ ! -x "$libdir/kimi-logits" ] || [ "$here/logits.cpp" -nt "$libdir/kimi-logits" ]; then
  c++ -O2 -std=c++17 "$here/logits.cpp" -I "$tree/include" -I "$tree/ggml/include" \
    -L "$libdir" -lllama -lggml -lggml-base -Wl,-rpath,"$libdir" -o "$libdir/kimi-logits"
fi

mkdir -p "$out/bin"
for tool in llama-bench llama-quantize llama-perplexity llama-tokenize kimi-logits; do
  ln -sf "$libdir/$tool" "$out/bin/$tool"
done
took=$(( $(date +%s) - start ))
{
  cat "$out/SOURCE"
  echo "flavour: $([ "$cuda" = 1 ] && echo cuda-sm90 || echo cpu)"
  echo "cmake flags: ${flags[*]}"
} > "$out/BUILD_INFO"
# One line per run: the first is the full build's time, later ones the (idle) incremental runs.
echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) $([ "$cuda" = 1 ] && echo cuda || echo cpu) ${took} s, $jobs jobs, $(nproc) cores" \
  >> "$out/BUILD_TIMES"
echo "build.sh: $out/bin ready (${took} s)"
