#!/usr/bin/env bash
# kimi-desk and llama.cpp on the CPU of one machine, in the same run, at the 48B model's shapes cut to 4
# layers (layer 0 dense, then K K M with 256 experts each, the full vocabulary): everything one device
# call needs, in order, each step's log and JSON in OUT.
#
#   packaging/bench/cpu/cpu_same_run.sh OUT
#
# 1. llama.cpp built for this CPU (build.sh, no CUDA) beside the random checkpoint (random_48b.py).
# 2. slice_48b.py: the checkpoint as GGUF quantized to Q4_K_M by llama.cpp's own tools, then ours in
#    int4 against it, reading and decoding at DEPTHS, on THREADS threads.
# 3. slice_48b.py --ours-only --profile: one decode step's PyTorch operators (our C kernels not shown).
# 4. ours alone again with threads that spin between parallel regions (OMP_WAIT_POLICY=ACTIVE) and with
#    threads that sleep at once (GOMP_SPINCOUNT=0), where kimi_desk's default on idle cores is a brief
#    spin, then sleep (engine/cpu_threads.py).
# 5. native_kernels.py: our C kernels against the PyTorch operators they replace, on this CPU.
# machine.txt: lscpu, then the seconds from the start at which each step ended.
# Work files go to .bench/ (ignored by git). THREADS (default: every core), DEPTHS (0,1024,8192,32768),
# ROUNDS (1: ours then llama.cpp that many times, alternating, medians and each round's ratio reported),
# LLAMA_ARGS (default "--repack 0": on CPUs with AMX llama-bench's AMX weight buffer aborts on this
# graph) and SOURCE (default .bench/llama.cpp-src.tar.xz, made by the llama-cpp-source tool) can be set.
set -euo pipefail
out=$(realpath -m "${1:?usage: cpu_same_run.sh OUT}")
here=$(cd "$(dirname "$0")" && pwd); repo=$(cd "$here/../../.." && pwd)
threads=${THREADS:-$(nproc)}; depths=${DEPTHS:-0,1024,8192,32768}; llama_args=${LLAMA_ARGS:---repack 0}
rounds=${ROUNDS:-1}
work="$repo/.bench"; llama="$work/llama-cpu"; ckpt="$work/r48-4"
mkdir -p "$out"
began=$SECONDS
lscpu > "$out/machine.txt"
if [ ! -x "$llama/bin/llama-bench" ]; then
    "$repo/packaging/bench/llama_cpp/build.sh" --jobs "$threads" --source "${SOURCE:-$work/llama.cpp-src.tar.xz}" "$llama" \
        >> "$out/prepare.log" 2>&1 &
    building=$!
fi
[ -f "$ckpt/config.json" ] || python3 "$repo/packaging/bench/llama_cpp/random_48b.py" "$ckpt" --layers 4 >> "$out/prepare.log" 2>&1
[ -z "${building:-}" ] || wait "$building"
echo "built and written: $((SECONDS - began)) s" | tee -a "$out/machine.txt"
python3 "$here/slice_48b.py" "$ckpt" --llama-cpp "$llama" --depths "$depths" --threads "$threads" \
    --rounds "$rounds" --llama-args "$llama_args" --json "$out/slice.json" > "$out/slice.log" 2>&1
echo "slice: $((SECONDS - began)) s" | tee -a "$out/machine.txt"
python3 "$here/slice_48b.py" "$ckpt" --ours-only --profile --depths 8192 --threads "$threads" > "$out/profile.log" 2>&1
for policy in "OMP_WAIT_POLICY=ACTIVE" "GOMP_SPINCOUNT=0"; do
    echo "$policy: $(env "$policy" python3 "$here/slice_48b.py" "$ckpt" --ours-only --depths 0,8192 --gen 16 2>/dev/null | tail -1)"
done > "$out/spin.log"
python3 "$here/native_kernels.py" --json "$out/native.json" > "$out/native.log" 2>&1
echo "done: $((SECONDS - began)) s" | tee -a "$out/machine.txt"
