"""llama.cpp's prefill and decode speed on GGUF files, through llama-bench, as one JSON document.

    python packaging/bench/llama_cpp/bench.py MODEL.gguf [MODEL.gguf ...] [--llama-cpp DIR] [--threads 2]
        [--prompt 512,2048] [--prompt-depth 0] [--gen 64] [--gen-depth 0,2048] [--reps 5] [--ngl 99]
        [--out results.json] [--gpu-memory-peak] [-- EXTRA llama-bench ARGS]

Two llama-bench runs per call (JSON output, parsed here): prefill of each --prompt length after each
--prompt-depth tokens already in the context, and decode of --gen tokens after each --gen-depth tokens
(llama-bench's -d: the depth is prefilled untimed before the timed part). llama-bench reports the mean
and standard deviation of tokens/s over --reps repetitions, after a warm-up run.

Output (stdout, and --out when given): {"llama_cpp": {build, cpu, gpu, backends, threads, ...},
"models": [{"file", "type", "size_bytes", "params", "prefill": [{"tokens", "depth", "tok_s", "tok_s_std",
"tok_s_median", "tok_s_max", "ms"}], "decode": [...]}]}. The info also holds the 1-minute load average
before and after: on a shared machine the figures are only as good as its idle cores. --gpu-memory-peak
samples nvidia-smi's memory.used every 100 ms while llama-bench runs and adds the peak over the reading
before it (`gpu_memory_peak_mib`): llama.cpp has no memory cap, so this is how a run shows that its
`-ngl` / `--n-cpu-moe` choice stayed within a budget. kimi-desk's own
benchmark runs this as a subprocess and puts the figures beside its own (a script of packaging/bench/,
the measurements, which the product never imports).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
DEFAULT_LLAMA_CPP = REPO / ".bench" / "llama-cpu"


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def run_llama_bench(
    binary: Path,
    models: list[Path],
    threads: int,
    prompt: list[int],
    gen: list[int],
    depth: list[int],
    reps: int,
    ngl: int,
    extra: list[str],
) -> list[dict]:
    """One llama-bench call; returns its JSON records (one per model x test)."""
    cmd = [
        str(binary),
        "-o",
        "json",
        "-t",
        str(threads),
        "-r",
        str(reps),
        "-ngl",
        str(ngl),
        "-p",
        ",".join(map(str, prompt or [0])),
        "-n",
        ",".join(map(str, gen or [0])),
        "-d",
        ",".join(map(str, depth or [0])),
    ]
    for m in models:
        cmd += ["-m", str(m)]
    cmd += extra
    print("bench.py: " + " ".join(cmd), file=sys.stderr)
    # llama.cpp's OpenMP threads wait as they do for its users: not as kimi_desk's import sets them for
    # itself (engine/cpu_threads.py `choose_wait`) when the benchmark runs from `kimi-desk bench`.
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"llama-bench failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


class GpuMemoryPeak:
    """The highest memory.used (MiB, all GPUs summed) nvidia-smi reports while the block runs, minus the
    reading before it."""

    def __init__(self, period_s: float = 0.1):
        self.period_s, self.peak_mib, self.baseline_mib = period_s, 0, 0
        self._stop = threading.Event()

    @staticmethod
    def used_mib() -> int:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            check=True,
        ).stdout
        return sum(int(x) for x in out.split())

    def _sample(self):
        while not self._stop.wait(self.period_s):
            self.peak_mib = max(self.peak_mib, self.used_mib())

    def __enter__(self):
        self.baseline_mib = self.peak_mib = self.used_mib()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, self.used_mib())


def summarize(records: list[dict], threads: int, extra_info: dict | None = None) -> dict:
    """llama-bench records -> {llama_cpp: ..., models: [...]}, prefill and decode apart."""
    models: dict[str, dict] = {}
    first = records[0] if records else {}
    for r in records:
        m = models.setdefault(
            r["model_filename"],
            {
                "file": r["model_filename"],
                "type": r["model_type"],
                "size_bytes": r["model_size"],
                "params": r["model_n_params"],
                "prefill": [],
                "decode": [],
            },
        )
        kind, tokens = ("prefill", r["n_prompt"]) if r["n_prompt"] > 0 else ("decode", r["n_gen"])
        samples = sorted(r.get("samples_ts") or [r["avg_ts"]])
        m[kind].append(
            {
                "tokens": tokens,
                "depth": r.get("n_depth", 0),
                "tok_s": r["avg_ts"],
                "tok_s_std": r["stddev_ts"],
                "tok_s_median": statistics.median(samples),
                "tok_s_max": samples[-1],
                "ms": r["avg_ns"] / 1e6,
            }
        )
    for m in models.values():
        for kind in ("prefill", "decode"):
            m[kind].sort(key=lambda e: (e["depth"], e["tokens"]))
    info = {
        "build": f"{first.get('build_number')} ({first.get('build_commit')})",
        "cpu": first.get("cpu_info"),
        "gpu": first.get("gpu_info"),
        "backends": first.get("backends"),
        "threads": threads,
        "n_batch": first.get("n_batch"),
        "n_ubatch": first.get("n_ubatch"),
        "n_gpu_layers": first.get("n_gpu_layers"),
        "flash_attn": first.get("flash_attn"),
        "test_time": first.get("test_time"),
        **(extra_info or {}),
    }
    return {"llama_cpp": info, "models": list(models.values())}


def table(result: dict) -> str:
    """The figures as a Markdown table (stderr), for reading in a terminal or pasting into a README."""
    lines = ["| model | test | depth | tok/s mean ± std | median | best |", "|---|---|---:|---:|---:|---:|"]
    for m in result["models"]:
        name = Path(m["file"]).name
        for kind, label in (("prefill", "pp"), ("decode", "tg")):
            for e in m[kind]:
                lines.append(
                    f"| {name} | {label}{e['tokens']} | {e['depth']} | {e['tok_s']:.1f} ± {e['tok_s_std']:.1f} "
                    f"| {e['tok_s_median']:.1f} | {e['tok_s_max']:.1f} |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path, help="GGUF files")
    parser.add_argument("--llama-cpp", type=Path, default=DEFAULT_LLAMA_CPP, help="build.sh's output folder")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int_list, default=[512, 2048], help="prefill lengths (empty: none)")
    parser.add_argument("--prompt-depth", type=int_list, default=[0], help="context before each prefill")
    parser.add_argument("--gen", type=int_list, default=[64], help="decode lengths (empty: none)")
    parser.add_argument("--gen-depth", type=int_list, default=[0, 2048], help="context before each decode")
    parser.add_argument("--reps", type=int, default=5, help="repetitions per test (llama-bench -r)")
    parser.add_argument("--ngl", type=int, default=99, help="layers on the GPU (no effect in a CPU build)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--gpu-memory-peak", action="store_true", help="sample nvidia-smi's memory.used")
    args = parser.parse_args(argv)

    binary = args.llama_cpp / "bin" / "llama-bench"
    if not binary.exists():
        raise SystemExit(f"{binary}: not found (run build.sh {args.llama_cpp} first)")
    for m in args.models:
        if not m.is_file():
            raise SystemExit(f"{m}: no such GGUF file")
    source = args.llama_cpp / "SOURCE"
    lines = source.read_text().splitlines() if source.exists() else []
    info = {"source": dict(line.split(": ", 1) for line in lines if ": " in line), "load_before": os.getloadavg()[0]}
    records: list[dict] = []
    with GpuMemoryPeak() if args.gpu_memory_peak else contextlib.nullcontext() as memory:
        if args.prompt:
            records += run_llama_bench(
                binary, args.models, args.threads, args.prompt, [], args.prompt_depth, args.reps, args.ngl, extra
            )
        if args.gen:
            records += run_llama_bench(
                binary, args.models, args.threads, [], args.gen, args.gen_depth, args.reps, args.ngl, extra
            )
    if memory is not None:
        info["gpu_memory_peak_mib"] = memory.peak_mib - memory.baseline_mib
    info["extra_args"] = extra
    info["load_after"] = os.getloadavg()[0]
    result = summarize(records, args.threads, info)
    text = json.dumps(result, indent=2)
    print(text)
    print(table(result), file=sys.stderr)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
