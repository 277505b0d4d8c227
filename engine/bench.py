"""CPU benchmark of the whole model: prefill and decode tokens/s and peak memory, beside the baseline
a user would otherwise pick (transformers' native Kimi Linear, pure-PyTorch path) on the same
checkpoint, measured in the same run.

Every measurement runs in its own child process, so that peak memory (the resident-set high-water
mark) belongs to that one implementation and length. `kimi-desk bench cpu --help` lists the options.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kimi_desk.engine.errors import UserError

PREFILL_CHUNK = 4096


def _rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _measure_ours(checkpoint: str, tokens: int, decode_tokens: int, seed: int) -> dict:
    import torch

    from kimi_desk.engine import load_model

    model = load_model(checkpoint, dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
    after_load = _rss_peak_mb()
    state = model.new_state(1)
    start = time.perf_counter()
    for i in range(0, tokens, PREFILL_CHUNK):
        logits = model(ids[:, i : i + PREFILL_CHUNK], state, last_only=True)
    prefill_s = time.perf_counter() - start
    token = logits[:, -1].argmax(-1, keepdim=True)
    start = time.perf_counter()
    for _ in range(decode_tokens):
        token = model(token, state)[:, -1].argmax(-1, keepdim=True)
    decode_s = time.perf_counter() - start
    return dict(prefill_s=prefill_s, decode_s=decode_s, rss_after_load_mb=after_load)


def _measure_transformers(checkpoint: str, tokens: int, decode_tokens: int, seed: int) -> dict:
    # transformers binds fla's Triton kernels when fla is importable; block it to get the pure-PyTorch path.
    sys.modules["fla"] = None
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
    after_load = _rss_peak_mb()
    cache = None
    with torch.no_grad():
        start = time.perf_counter()
        # Same chunking as ours: one call over 64k tokens would need 64 GB for eager attention scores.
        for i in range(0, tokens, PREFILL_CHUNK):
            out = model(ids[:, i : i + PREFILL_CHUNK], past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
        prefill_s = time.perf_counter() - start
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(token, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        decode_s = time.perf_counter() - start
    return dict(prefill_s=prefill_s, decode_s=decode_s, rss_after_load_mb=after_load)


def _worker(argv: list[str]) -> None:
    impl, checkpoint, tokens, decode_tokens, seed = argv
    import torch

    torch.manual_seed(int(seed))
    measure = _measure_ours if impl == "kimi-desk" else _measure_transformers
    result = measure(checkpoint, int(tokens), int(decode_tokens), int(seed))
    result["peak_rss_mb"] = _rss_peak_mb()
    print(json.dumps(result))


def _run_worker(impl: str, checkpoint: Path, tokens: int, decode_tokens: int, seed: int) -> dict:
    cmd = [sys.executable, "-m", "kimi_desk.engine.bench", "--worker", impl, str(checkpoint), str(tokens),
           str(decode_tokens), str(seed)]
    # From a neutral folder: run from this repository, `python -m` would put its top-level `kernels/`
    # folder first on sys.path, where it hides the `kernels` package that transformers imports.
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(error=f"{impl} at {tokens} tokens failed: {last}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["prefill_tok_s"] = tokens / result["prefill_s"]
    result["decode_tok_s"] = decode_tokens / result["decode_s"] if decode_tokens else None
    result["working_set_mb"] = result["peak_rss_mb"] - result["rss_after_load_mb"]
    return result


def run_cpu_benchmark(tokens: list[int], decode_tokens: int, baseline: bool, checkpoint: Path | None,
                      seed: int, log=print) -> dict:
    import torch

    from kimi_desk.engine.random_checkpoint import bench_config, write_random_checkpoint

    with tempfile.TemporaryDirectory(prefix="kimi-desk-bench-") as tmp:
        if checkpoint is None:
            checkpoint = write_random_checkpoint(bench_config(), Path(tmp) / "model", seed=seed)
        n_params = _count_parameters(checkpoint)
        rows = []
        for n in tokens:
            row = dict(tokens=n, ours=_run_worker("kimi-desk", checkpoint, n, decode_tokens, seed))
            log(f"kimi-desk    {n:>7} tokens: {_describe(row['ours'])}")
            if baseline:
                row["baseline"] = _run_worker("transformers", checkpoint, n, decode_tokens, seed)
                log(f"transformers {n:>7} tokens: {_describe(row['baseline'])}")
            rows.append(row)
    return dict(
        benchmark="cpu", date=datetime.date.today().isoformat(), machine=_machine(),
        torch=torch.__version__, threads=torch.get_num_threads(), parameters=n_params,
        prefill_chunk=PREFILL_CHUNK, decode_tokens=decode_tokens, rows=rows,
    )


def _count_parameters(checkpoint: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(checkpoint).glob("*.safetensors")):
        with safe_open(f, framework="pt") as reader:
            for name in reader.keys():
                shape = reader.get_slice(name).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
    return total


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def _describe(r: dict) -> str:
    if "error" in r:
        return r["error"]
    decode = f", decode {r['decode_tok_s']:.1f} tok/s" if r.get("decode_tok_s") else ""
    return f"prefill {r['prefill_tok_s']:.0f} tok/s{decode}, peak RSS {r['peak_rss_mb']:.0f} MB"


def markdown_table(result: dict) -> str:
    lines = [
        f"CPU: {result['machine']}, torch {result['torch']}, {result['threads']} threads, {result['date']}; "
        f"random model of {result['parameters'] / 1e6:.1f} M parameters, float32, prefill in chunks of "
        f"{result['prefill_chunk']}, greedy decode of {result['decode_tokens']} tokens after the prefill.",
        "",
        "| tokens | kimi-desk prefill tok/s | transformers prefill tok/s | ratio | kimi-desk decode tok/s "
        "| transformers decode tok/s | ratio | kimi-desk peak RSS MB | transformers peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        ours, base = row["ours"], row.get("baseline", {})

        def cell(r, key, fmt="{:.0f}"):
            return fmt.format(r[key]) if r.get(key) is not None else "n/a"

        def ratio(key):
            if ours.get(key) and base.get(key):
                return f"{ours[key] / base[key]:.1f}x"
            return "n/a"

        lines.append(
            f"| {row['tokens']} | {cell(ours, 'prefill_tok_s')} | {cell(base, 'prefill_tok_s')} | {ratio('prefill_tok_s')} "
            f"| {cell(ours, 'decode_tok_s', '{:.1f}')} | {cell(base, 'decode_tok_s', '{:.1f}')} | {ratio('decode_tok_s')} "
            f"| {cell(ours, 'peak_rss_mb')} | {cell(base, 'peak_rss_mb')} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", default="4096,65536",
                        help="comma-separated document lengths to prefill (default: 4096,65536)")
    parser.add_argument("--decode-tokens", type=int, default=32, help="tokens to decode after each prefill")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip transformers' pure-PyTorch Kimi Linear (needs the dev extra: transformers)")
    parser.add_argument("--model", type=Path, default=None,
                        help="a checkpoint folder (default: a random ~20 M-parameter model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")


def main(args: argparse.Namespace) -> int:
    try:
        tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--tokens must be comma-separated integers, got {args.tokens!r}") from None
    if not tokens or any(t <= 0 for t in tokens):
        raise UserError("--tokens needs at least one positive length")
    baseline = not args.no_baseline
    if baseline:
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise UserError("the baseline needs transformers (pip install 'kimi-desk[dev]'), or pass --no-baseline") from None
    result = run_cpu_benchmark(tokens, args.decode_tokens, baseline, args.model, args.seed,
                               log=lambda line: print(line, file=sys.stderr, flush=True))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown_table(result))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2:])
