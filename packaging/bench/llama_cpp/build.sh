#!/usr/bin/env bash
# Builds llama.cpp (the copy vendored by the llama-cpp-python sdist, which runs Kimi Linear) as a same-run
# reference for kimi-desk's benchmarks: llama-bench, llama-quantize, llama-perplexity, llama-tokenize and
# our own logits dumper (logits.cpp, beside this script), into OUT_DIR.
#
# Usage: build.sh [--cuda] [--jobs N] [--source SDIST_OR_TARBALL] OUT_DIR
#   --cuda     build the CUDA backend for the H200 (-DGGML_CUDA=ON, sm_90, ninja); default CPU only
#   --source   a llama_cpp_python-*.tar.gz sdist or a tarball of a llama.cpp tree (as made by
#              /work/shared/tools/llama-cpp-source.sh); default: `pip download` of the sdist below
# Layout of OUT_DIR: src/llama.cpp (the tree; convert.py runs its convert_hf_to_gguf.py), build/
# (cmake), bin/ (links to the binaries), BUILD_INFO (source, flags), BUILD_TIMES (one line per run).
# Idempotent: a second run reuses the unpacked tree and the cmake build (ninja rebuilds nothing).
#
# Measured: CPU build on 2 shared cores (Debian 12, gcc 12.2, cmake 3.25, ninja), 2026-12-03:
#   TODO minutes.  The CUDA build on the 16-core H200 host: about 4.5 min for llama-bench and
#   llama-quantize (header of llama-cpp-source.sh); with llama-perplexity and the dumper expect ~5 min.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36
here=$(cd "$(dirname "$0")" && pwd)
cuda=0; jobs=$(nproc); source_arg=""; out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cuda) cuda=1 ;;
    --jobs) jobs=$2; shift ;;
    --source) source_arg=$(realpath "$2"); shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
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
  mkdir -p "$out/src"; rm -rf "$tree"
  mv "$(dirname "$(dirname "$(dirname "$found")")")" "$tree"
  echo "source: $(basename "$source_arg")" > "$out/SOURCE"
fi

# 2. Configure (once per flavour) and build the tools we use.
build="$out/build"
flags=(-DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
       -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=ON)
if [ "$cuda" = 1 ]; then
  flags+=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90)
fi
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
if [ ! -f "$build/CMakeCache.txt" ] || ! grep -q "^GGML_CUDA:BOOL=$([ "$cuda" = 1 ] && echo ON || echo OFF)" "$build/CMakeCache.txt"; then
  rm -rf "$build"
  cmake -S "$tree" -B "$build" "${generator[@]}" "${flags[@]}"
fi
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
