"""llama.cpp beside our engine in `kimi-desk bench cpu --llama-cpp DIR`: the same checkpoint as GGUF, the
same readings and decode depths, the same threads, in the same run.

Formats side by side: our none (the checkpoint's bf16) with llama.cpp's bf16 GGUF, int8 with Q8_0, int4
with Q4_K_M (the level llama.cpp's users pick for 4-bit). The GGUFs are written once per checkpoint by
packaging/bench/llama_cpp/convert.py (llama.cpp's own converter, then llama-quantize) into a folder of
converted files, named by the checkpoint's fingerprint, and reused while the checkpoint is unchanged.

Each GGUF is timed by llama-bench (through packaging/bench/llama_cpp/bench.py) in a child process of its
own, so that the children's peak resident memory is llama-bench's for that file. A reading START+TOKENS
is llama-bench `-p TOKENS -d START`: the START tokens are prefilled untimed before every repetition
(llama.cpp has no way to start from a synthetic cache), so depths beyond --llama-max-depth are left out
and said so; decode after C tokens is `-n STEPS -d C`. llama-bench reports every repetition after one
warm-up run: the best is set beside our best reading, the median and best beside our decode's.
"""

from __future__ import annotations

import importlib.util
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

LLAMA_SCRIPTS = Path(__file__).resolve().parents[1] / "llama_cpp"
# Our weight format -> the GGUF type set beside it.
GGUF_TYPE = {"none": "bf16", "int8": "Q8_0", "int4": "Q4_K_M"}


def _extra_args() -> list[str]:
    """llama-bench options for this CPU: on CPUs with AMX its AMX weight buffers crash on Kimi Linear's
    graph (signal 11 on a Q4_K_M file), and `--repack 0` keeps its plain CPU buffers there."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return ["--repack", "0"] if "amx_int8" in flags.split() else []


def _bench_module():
    spec = importlib.util.spec_from_file_location("kimi_desk_llama_bench", LLAMA_SCRIPTS / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_build(llama_cpp: Path) -> str | None:
    """None when DIR is a usable build.sh output, else what is missing (one line)."""
    for need in (
        llama_cpp / "bin" / "llama-bench",
        llama_cpp / "bin" / "llama-quantize",
        llama_cpp / "src" / "llama.cpp" / "convert_hf_to_gguf.py",
    ):
        if not need.is_file():
            return f"--llama-cpp {llama_cpp}: no {need.relative_to(llama_cpp)} (build it with packaging/bench/llama_cpp/build.sh)"
    return None


def gguf_files(model: Path, fingerprint: str, llama_cpp: Path, folder: Path, formats: list[str], log=print) -> dict:
    """{our format: GGUF path} for the formats llama.cpp has a counterpart of, converting what is missing."""
    base = folder / f"{model.resolve().name}-{fingerprint[:16]}-bf16.gguf"
    wanted = {
        f: base if GGUF_TYPE[f] == "bf16" else base.with_name(f"{base.stem}-{GGUF_TYPE[f]}.gguf")
        for f in formats
        if f in GGUF_TYPE
    }
    missing = [f for f, path in wanted.items() if not path.is_file()]
    if missing:
        quantize = ",".join(GGUF_TYPE[f] for f in missing if GGUF_TYPE[f] != "bf16")
        command = [
            sys.executable,
            str(LLAMA_SCRIPTS / "convert.py"),
            str(model.resolve()),
            str(base),
            "--llama-cpp",
            str(llama_cpp.resolve()),
        ] + (["--quantize", quantize] if quantize else [])
        if base.is_file():
            command.append("--skip-convert")
        log(f"llama.cpp: converting {model} to GGUF ({', '.join(GGUF_TYPE[f] for f in missing)}) in {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        # From a neutral folder: the repository's top-level kernels/ would hide the package transformers imports.
        proc = subprocess.run(command, capture_output=True, text=True, cwd=tempfile.gettempdir())
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"GGUF conversion failed: {last}")
    return wanted


def worker(options: dict) -> dict:
    """One GGUF through llama-bench: the readings and decode depths of `options`; runs in its own process."""
    bench = _bench_module()
    binary = Path(options["llama_cpp"]) / "bin" / "llama-bench"
    model, threads, reps = [Path(options["gguf"])], options["llama_threads"], options["repeats"]
    max_depth = options["llama_max_depth"]
    result = dict(
        format="llama.cpp",
        dtype=options["gguf_type"],
        gguf=options["gguf"],
        gguf_mb=Path(options["gguf"]).stat().st_size / 1e6,
        threads=threads,
        reading=[],
        decoding=[],
        left_out=[],
        extra_args=_extra_args(),
    )
    for start, tokens in options["prefill"]:
        if start > max_depth:
            result["left_out"].append(f"reading {tokens} after {start}")
            continue
        records = bench.run_llama_bench(binary, model, threads, [tokens], [], [start], reps, 0, result["extra_args"])
        entry = bench.summarize(records, threads)["models"][0]["prefill"][0]
        result["reading"].append(
            dict(
                start=start,
                tokens=tokens,
                tok_s=entry["tok_s_max"],
                tok_s_mean=entry["tok_s"],
                tok_s_std=entry["tok_s_std"],
            )
        )
    depths = [c for c in options["decode_at"] if c <= max_depth]
    result["left_out"] += [f"decode after {c}" for c in options["decode_at"] if c > max_depth]
    if depths:
        records = bench.run_llama_bench(
            binary, model, threads, [], [options["decode_steps"]], depths, reps, 0, result["extra_args"]
        )
        summary = bench.summarize(records, threads)
        result["build"] = summary["llama_cpp"]["build"]
        for entry in summary["models"][0]["decode"]:
            result["decoding"].append(
                dict(
                    cached=entry["depth"],
                    steps=entry["tokens"],
                    tok_s_median=entry["tok_s_median"],
                    tok_s_best=entry["tok_s_max"],
                    tok_s_mean=entry["tok_s"],
                )
            )
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux reports KiB
    return result
