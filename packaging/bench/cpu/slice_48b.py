"""The 48B model's shapes on this CPU: ours in int4 beside llama.cpp's Q4_K_M, in the same run, on the
same cores. The checkpoint is random, cut to a few layers (packaging/bench/llama_cpp/random_48b.py:
layer 0 dense, then MoE layers of 256 experts, K K K M), converted and quantized by llama.cpp's own
tools (packaging/bench/llama_cpp/convert.py); each engine then runs alone.

    python packaging/bench/cpu/slice_48b.py CHECKPOINT [--llama-cpp .bench/llama-cpu] [--gguf-dir .bench/gguf]
        [--prompt 512] [--depths 0,1024] [--gen 16] [--threads N] [--llama-args "--repack 0"] [--json OUT]

Ours: the checkpoint loaded as `kimi-desk` loads it on this CPU (int4, the dtype
engine/memory.py `cpu_compute_dtype` takes here, the int4 cache beside the checkpoint made on the first
run), `--prompt` tokens read in one chunk (best of 2), then `--gen` decode steps after each depth, the
median (the depth's cache is random latents: a step's time depends on the cache's length, not its
values). llama.cpp: `llama-bench -p PROMPT -n GEN -d DEPTHS -t THREADS -r 2` on the Q4_K_M file (it
prefills each depth untimed before the timed part). Threads: ours as the engine chooses them (the cores
idle at load), llama.cpp's as many unless --threads fixes both. --llama-args passes options to
llama-bench: on CPUs with AMX its default weight buffers abort on Kimi Linear's graph, `--repack 0` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
LLAMA = REPO / "packaging" / "bench" / "llama_cpp"

# Decode steps the --profile table sums over.
PROFILED_STEPS = 5


def ours(checkpoint: Path, prompt: int, depths: list[int], gen: int, profile: bool = False) -> dict:
    import torch

    from kimi_desk.engine.config import KimiLinearConfig
    from kimi_desk.engine.cpu_threads import use_idle_cores
    from kimi_desk.engine.fuse import fuse_projections
    from kimi_desk.engine.generate import decode_step_function
    from kimi_desk.engine.memory import available_cpu_memory, cpu_compute_dtype
    from kimi_desk.engine.quantize import prepare_for_cpu
    from kimi_desk.engine.reading_time import state_with_cache
    from kimi_desk.engine.weights import load_model
    from kimi_desk.kernels.quant.avx2 import quantized_backend

    use_idle_cores()
    config = KimiLinearConfig.from_file(checkpoint / "config.json")
    dtype = cpu_compute_dtype(config, "int4", available_cpu_memory())
    started = time.perf_counter()
    model = fuse_projections(load_model(checkpoint, "cpu", getattr(torch, dtype), quantize="int4", notice=print))
    loaded = time.perf_counter()
    prepare_for_cpu(model)  # the int4 matrices into the CPU kernels' tiles, at every start
    result = dict(
        dtype=dtype,
        threads=torch.get_num_threads(),
        load_s=time.perf_counter() - started,
        cpu_layout_s=time.perf_counter() - loaded,
        kernels=quantized_backend(),
    )
    ids = torch.randint(0, config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    seconds = []
    for _ in range(2):
        state = model.new_state(1)
        started = time.perf_counter()
        model(ids, state, last_only=True)
        seconds.append(time.perf_counter() - started)
    result["prefill"] = dict(tokens=prompt, tok_s=prompt / min(seconds))
    result["decode"] = []
    for depth in depths:
        state = state_with_cache(model, depth) if depth else model.new_state(1)
        step = decode_step_function(model, state, config.vocab_size)
        token, times = 5, []
        for _ in range(gen + 1):  # the first step warms up
            started = time.perf_counter()
            token = step(token)
            times.append(time.perf_counter() - started)
        result["decode"].append(dict(depth=depth, tok_s=1 / statistics.median(times[1:])))
    if profile:  # more steps after the last depth, and one more reading, their operators by CPU time
        calls: dict[str, list[float]] = {}
        show_native_kernels(calls)
        step = decode_step_function(model, state, config.vocab_size)  # recorded again, the kernels traced
        for _ in range(PROFILED_STEPS):
            step(token)
        print(f"our C kernels' calls in {PROFILED_STEPS} decode steps, timed around each call:", file=sys.stderr)
        for label, seconds in sorted(calls.items(), key=lambda item: -sum(item[1])):
            per_step = sum(seconds) / PROFILED_STEPS * 1e3
            print(f"  {label}: {len(seconds)} calls, {per_step:.3f} ms a step", file=sys.stderr)
        steps = lambda: [step(token) for _ in range(PROFILED_STEPS)]  # noqa: E731
        for label, run in ((f"{PROFILED_STEPS} decode steps", steps), ("reading", lambda: read(model, ids))):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                run()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70)
            print(f"{label}:\n{table}", file=sys.stderr)
    return result


def read(model, ids):
    model(ids, model.new_state(1), last_only=True)


def show_native_kernels(calls: dict[str, list[float]]) -> None:
    """Each call of our C kernels (kernels/native.py) as a `C::name(sizes)` row in the profiler's table,
    which otherwise counts their time to nothing, and its wall time appended to `calls[label]`: the
    profiler's own rows for these threaded calls are not their time (several times longer on 16 cores;
    BENCHMARKS-log.md). The functions called so far are traced, in the steps recorded from now on too."""
    import torch

    from kimi_desk.kernels import native
    from kimi_desk.kernels.dense import bf16_cpu
    from kimi_desk.kernels.kda import avx2 as kda
    from kimi_desk.kernels.mla import avx2 as mla
    from kimi_desk.kernels.moe import router_cpu
    from kimi_desk.kernels.norm import avx2 as norm
    from kimi_desk.kernels.quant import avx2 as quant

    for module in (kda, mla, norm, quant, bf16_cpu, router_cpu):
        lib = module.library()
        for name, function in list(vars(lib or object()).items()):
            if isinstance(function, native.KernelFunction):

                def traced(*args, _function=function.function, _name=name):
                    # The call's sizes (its small integer arguments) in the label: one row per shape.
                    sizes = ",".join(str(a) for a in args if isinstance(a, int) and 1 < a < 1 << 20)
                    label = f"C::{_name}({sizes})"
                    with torch.profiler.record_function(label):
                        started = time.perf_counter()
                        result = _function(*args)
                        calls.setdefault(label, []).append(time.perf_counter() - started)
                        return result

                traced.__name__ = name
                object.__setattr__(function, "function", traced)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--llama-cpp", type=Path, default=REPO / ".bench" / "llama-cpu")
    ap.add_argument("--gguf-dir", type=Path, default=REPO / ".bench" / "gguf")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--depths", default="0,1024")
    ap.add_argument("--gen", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="ours then llama.cpp this many times, alternating; the table gives medians and each round's ratio",
    )
    ap.add_argument(
        "--llama-args",
        default="",
        help="more llama-bench options, e.g. '--repack 0' (on CPUs with AMX its AMX weight buffer aborts on this graph)",
    )
    ap.add_argument("--ours-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument(
        "--profile",
        action="store_true",
        help="with --ours-only: a few more decode steps' and one more reading's operators",
    )
    args = ap.parse_args(argv)
    depths = [int(d) for d in args.depths.split(",")]
    if args.ours_only:  # the worker: ours in its own process, its JSON on the last line
        print(json.dumps(ours(args.checkpoint, args.prompt, depths, args.gen, args.profile)))
        return 0
    gguf = args.gguf_dir / f"{args.checkpoint.name}-bf16.gguf"
    quantized = gguf.with_name(gguf.stem + "-Q4_K_M.gguf")
    if not quantized.exists():
        args.gguf_dir.mkdir(parents=True, exist_ok=True)
        convert = [sys.executable, str(LLAMA / "convert.py"), str(args.checkpoint), str(gguf)]
        convert += ["--llama-cpp", str(args.llama_cpp), "--quantize", "Q4_K_M"]
        subprocess.run(convert + (["--skip-convert"] if gguf.exists() else []), check=True)
        gguf.unlink()  # the bf16 file is only the quantizer's input
    env = dict(os.environ, **({"KIMI_DESK_THREADS": str(args.threads)} if args.threads else {}))
    worker = [sys.executable, __file__, str(args.checkpoint), "--ours-only", "--prompt", str(args.prompt)]
    worker += ["--depths", args.depths, "--gen", str(args.gen)]
    threads = args.threads or os.cpu_count()
    bench = [sys.executable, str(LLAMA / "bench.py"), str(quantized), "--llama-cpp", str(args.llama_cpp)]
    bench += ["--threads", str(threads), "--prompt", str(args.prompt), "--gen", str(args.gen)]
    bench += ["--gen-depth", args.depths, "--reps", "2", "--ngl", "0"]
    bench += ["--", *shlex.split(args.llama_args)] if args.llama_args else []
    rounds = []  # (ours, llama.cpp's): one process each, in turn, so that both meet the same drift
    for _ in range(max(1, args.rounds)):
        proc = subprocess.run(worker, capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "ours: failed")
        mine = json.loads(proc.stdout.strip().splitlines()[-1])
        llama = json.loads(subprocess.run(bench, capture_output=True, text=True, check=True).stdout)
        rounds.append((mine, llama))
    print(comparison_table(rounds, args.prompt, threads))
    if args.json:
        ours_runs, llama_runs = zip(*rounds)
        args.json.write_text(json.dumps(dict(ours=list(ours_runs), llama_cpp=list(llama_runs)), indent=2) + "\n")
    return 0


def comparison_table(rounds: list[tuple[dict, dict]], prompt: int, threads: int) -> str:
    """Markdown: each measurement's median over the rounds, ours and llama.cpp's, the median of the rounds'
    ratios, and (more than one round) each round's ratio."""
    mine = rounds[0][0]

    def measured(run_ours, run_llama, what):
        theirs = run_llama["models"][0]
        if what == "prefill":
            return run_ours["prefill"]["tok_s"], next(p["tok_s"] for p in theirs["prefill"] if p["tokens"] == prompt)
        ours_at = next(d["tok_s"] for d in run_ours["decode"] if d["depth"] == what)
        return ours_at, next(d["tok_s"] for d in theirs["decode"] if d["depth"] == what)

    several = len(rounds) > 1
    lines = [
        f"| measurement | ours int4 ({mine['dtype']}, {mine['threads']} threads) | llama.cpp Q4_K_M ({threads} threads) "
        "| ours / llama.cpp |" + (" each round |" if several else ""),
        "|---|---:|---:|---:|" + ("---|" if several else ""),
    ]
    for what in ["prefill", *(row["depth"] for row in mine["decode"])]:
        pairs = [measured(o, ll, what) for o, ll in rounds]
        ratios = [a / b for a, b in pairs]
        name = f"reading {prompt} tokens, tok/s" if what == "prefill" else f"decode after {what:,}, tok/s"
        row = (
            f"| {name} | {statistics.median(a for a, _ in pairs):.2f} | {statistics.median(b for _, b in pairs):.2f} "
            f"| {statistics.median(ratios):.2f}x |"
        )
        lines.append(row + (" " + " / ".join(f"{r:.2f}" for r in ratios) + " |" if several else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
