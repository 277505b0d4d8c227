#!/usr/bin/env bash
# kimi-desk and llama.cpp on the same GPU machine, in the same run, at the 48B model's shapes cut to a few
# layers (K K K M: 3 KDA layers, 1 MLA layer, layer 0 dense, the full vocabulary).
#
# Usage, from the repository root on the GPU machine (two phases, so that each fits one device call):
#   packaging/bench/llama_cpp/gpu_same_run.sh prepare OUT   # build llama.cpp (CUDA), the random
#       checkpoint, its GGUF in bf16, Q8_0 and Q4_K_M (build and conversion run side by side)
#   packaging/bench/llama_cpp/gpu_same_run.sh bench OUT     # ours (int4, int8 in one process), then
#       llama-bench on Q4_K_M and Q8_0, nothing else running; JSON and logs into OUT
#   packaging/bench/llama_cpp/gpu_same_run.sh deep OUT      # after prepare: the bf16 files removed (disk),
#       Q4_K_M deepened to the 48B model's 27 layers (deepen_gguf.py)
#   packaging/bench/llama_cpp/gpu_same_run.sh budget OUT    # after deep: ours at 27 layers in int4 under
#       each GPU budget of BUDGETS (24GiB,16GiB), then llama-bench on the 27-layer Q4_K_M with the routed
#       experts of the first N layers in RAM, one run for each N of NCMOE (its -ncmoe; default 9,17, which
#       fit 24 and 16 GiB), each run's peak GPU memory sampled (llama.cpp has no memory cap: the peak
#       shows which N fits which budget)
# Work files go to .bench/ (ignored by git). LAYERS (default 4), REPS (3), DEPTHS (8192,131072), QUANTS
# (Q8_0,Q4_K_M), UBATCH (llama.cpp's -ub in the budget runs, 2048), PREFILL (tokens ours reads in the
# budget runs, timed at each power of two: 131072), READS (contexts the plan is asked to fit:
# 131072,1048576) and SOURCE (default
# .bench/llama.cpp-src.tar.xz, made by the llama-cpp-source tool) can be set.
# Ours builds its own random weights at the same shapes in memory (`kimi-desk bench model --layers`):
# the speed of a layer does not depend on its values, and random routers spread tokens over the experts
# in both engines alike.
set -euo pipefail
phase=${1:?usage: gpu_same_run.sh prepare|bench OUT}; out=$(realpath -m "${2:?OUT}")
here=$(cd "$(dirname "$0")" && pwd); repo=$(cd "$here/../../.." && pwd)
layers=${LAYERS:-4}; reps=${REPS:-3}; depths=${DEPTHS:-8192,131072}
work="$repo/.bench"; llama="$work/llama-cuda"; ckpt="$work/r48-$layers"; gguf="$work/gguf/r48-$layers-bf16.gguf"
mkdir -p "$out" "$work/gguf"
cd "$repo"
source packaging/source_shim.sh
export PYTHONUNBUFFERED=1

case "$phase" in
prepare)
  t0=$(date +%s)
  "$here/build.sh" --cuda --jobs "$(nproc)" --source "${SOURCE:-$work/llama.cpp-src.tar.xz}" "$llama" \
    > "$out/build.log" 2>&1 &
  build=$!
  [ -f "$ckpt/config.json" ] || python3 "$here/random_48b.py" "$ckpt" --layers "$layers" > "$out/checkpoint.log" 2>&1
  echo "checkpoint: $(( $(date +%s) - t0 )) s"
  # The converter runs from the unpacked tree, which build.sh writes first.
  until [ -f "$llama/src/llama.cpp/convert_hf_to_gguf.py" ]; do sleep 2; kill -0 $build 2>/dev/null || break; done
  [ -f "$gguf" ] || python3 "$here/convert.py" "$ckpt" "$gguf" --llama-cpp "$llama" > "$out/convert.log" 2>&1
  echo "bf16 GGUF: $(( $(date +%s) - t0 )) s"
  wait $build || { tail -30 "$out/build.log"; exit 1; }
  echo "build: done at $(( $(date +%s) - t0 )) s"
  python3 "$here/convert.py" "$ckpt" "$gguf" --llama-cpp "$llama" --skip-convert --quantize "${QUANTS:-Q8_0,Q4_K_M}" \
    > "$out/quantize.log" 2>&1
  ls -la "$work/gguf" | tee "$out/gguf.txt"
  echo "prepare: $(( $(date +%s) - t0 )) s"
  ;;
bench)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
  python3 -m kimi_desk.app.cli bench model --layers "$layers" --quantize int4,int8 --contexts "$depths" \
    --prefill-tokens 16384 --no-baseline --json "$out/ours.json" 2>&1 | tee "$out/ours.log"
  python3 "$here/bench.py" "${gguf%.gguf}-Q4_K_M.gguf" "${gguf%.gguf}-Q8_0.gguf" --llama-cpp "$llama" \
    --threads "$(nproc)" --prompt 512,8192 --gen 64 --gen-depth "$depths" --reps "$reps" \
    --out "$out/llama.json" 2>&1 | tee "$out/llama.log"
  ;;
deep)
  rm -rf "$ckpt" "$gguf" "${gguf%.gguf}-Q8_0.gguf"
  python3 "$here/deepen_gguf.py" "${gguf%.gguf}-Q4_K_M.gguf" "$work/gguf/r48-27-Q4_K_M.gguf" --layers 27 \
    --llama-cpp "$llama" 2>&1 | tee "$out/deep.log"
  ;;
budget)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
  python3 -m kimi_desk.app.cli bench model --layers 27 --quantize int4 --gpu-memory "${BUDGETS:-24GiB,16GiB}" \
    --contexts "$depths" --prefill-tokens "${PREFILL:-131072}" --read-tokens "${READS:-131072,1048576}" --json "$out/ours-budget.json" \
    > "$out/ours-budget.log" 2>&1 || echo "ours: exit $? (see ours-budget.log)"
  tail -40 "$out/ours-budget.log"
  ncmoe=${NCMOE:-9,17}
  for n in ${ncmoe//,/ }; do
    python3 "$here/bench.py" "$work/gguf/r48-27-Q4_K_M.gguf" --llama-cpp "$llama" --threads "$(nproc)" \
      --prompt 8192 --gen 64 --gen-depth "$depths" --reps "$reps" --gpu-memory-peak \
      --out "$out/llama-ncmoe-$n.json" -- -ncmoe "$n" -ub "${UBATCH:-2048}" 2>&1 | tee "$out/llama-ncmoe-$n.log" | tail -8 || true
    grep -o '"gpu_memory_peak_mib": [0-9]*' "$out/llama-ncmoe-$n.json" || true
  done
  ;;
*) echo "gpu_same_run.sh: unknown phase $phase" >&2; exit 2 ;;
esac
