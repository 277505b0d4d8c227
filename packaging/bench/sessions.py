"""Benchmark of sessions on this machine: reading a document into a session against restoring it from
its snapshot, snapshot size against tokens, and peak memory while reading documents of growing length.

Every reading runs in its own child process, so that its peak resident memory is its own. The model is
a random ~20 M-parameter model with a small trained tokenizer (a stand-in for the demo model);
`kimi-desk bench sessions --help` lists the options.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kimi_desk.engine.errors import UserError

WORDS = (
    "alpha beta gamma delta epsilon kernel state token layer cache decay gate value query key chunk "
    "matrix vector snapshot session reader parser config module function return import class"
).split()


def write_document(folder: Path, tokenizer, tokens: int) -> None:
    """A folder of Python-like files whose rendering is about `tokens` tokens long."""
    import random

    rng = random.Random(tokens)
    folder.mkdir(parents=True)
    written, index = 0, 0
    while written < tokens:
        lines = [
            f"def {rng.choice(WORDS)}_{index}_{i}({rng.choice(WORDS)}):\n    return "
            + " + ".join(f"{rng.choice(WORDS)}_{rng.randrange(100)}" for _ in range(6))
            + "\n"
            for i in range(40)
        ]
        text = "".join(lines)
        (folder / f"module_{index:04d}.py").write_text(text)
        written += len(tokenizer.encode(text)) + 12  # the file's header
        index += 1


def _worker(argv: list[str]) -> None:
    """Read (or restore) one document in this process; print a JSON line."""
    mode, model_path, document, home = argv
    import torch

    from kimi_desk.bench.cpu import _rss_peak_mb
    from kimi_desk.engine.session import Assistant, SessionStore

    torch.manual_seed(0)
    assistant = Assistant.load(model_path, dtype=torch.float32)
    store = SessionStore(Path(home))
    after_load = _rss_peak_mb()
    started = time.perf_counter()
    if mode == "read":
        session = assistant.read(store, document)
    else:
        (session,) = store.list()
        assistant.document_state(session)  # loads and checks the snapshot
    seconds = time.perf_counter() - started
    snapshots = session.snapshots()
    print(
        json.dumps(
            {
                "seconds": seconds,
                "tokens": session.document_tokens,
                "snapshot_bytes": snapshots.nbytes(),
                "checkpoints": len(snapshots.positions),
                "peak_rss_mb": _rss_peak_mb(),
                "rss_after_load_mb": after_load,
            }
        )
    )


def _run(mode: str, model: Path, document: Path, home: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "kimi_desk.bench.sessions", "--worker", mode, str(model), str(document), str(home)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} of {document.name} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_session_benchmark(restore_tokens: int, memory_tokens: list[int], log=print) -> dict:
    import torch

    from kimi_desk.bench.cpu import _harness
    from kimi_desk.bench.random_checkpoint import (
        bench_config,
        write_random_checkpoint,
        write_small_tokenizer,
    )
    from kimi_desk.engine.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="kimi-desk-bench-") as tmp:
        tmp = Path(tmp)
        model = write_random_checkpoint(bench_config(), tmp / "model", seed=0)
        write_small_tokenizer(model, base_vocab=4000)
        tokenizer = load_tokenizer(model)
        rows = []
        for tokens in sorted(set(memory_tokens) | {restore_tokens}):
            document = tmp / f"doc_{tokens}"
            write_document(document, tokenizer, tokens)
            home = tmp / f"home_{tokens}"
            read = _run("read", model, document, home)
            row = {"target_tokens": tokens, "read": read}
            log(
                f"read    {read['tokens']:>8,} tokens: {read['seconds']:.1f} s, peak RSS {read['peak_rss_mb']:.0f} MB, "
                f"snapshot {read['snapshot_bytes'] / 1e6:.1f} MB"
            )
            if tokens == restore_tokens:
                row["restore"] = _run("restore", model, document, home)
                log(f"restore {read['tokens']:>8,} tokens: {row['restore']['seconds']:.2f} s")
            rows.append(row)
    return {
        "benchmark": "sessions",
        "date": datetime.date.today().isoformat(),
        "machine": _harness()._machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }


def markdown_table(result: dict) -> str:
    lines = [
        f"CPU: {result['machine']}, torch {result['torch']}, {result['threads']} threads, {result['date']}; "
        "random model of 21.8 M parameters (bench_config), float32; a synthetic code folder per length.",
        "",
        "| tokens | read s | read tok/s | restore s | re-read / restore | snapshot MB | snapshot bytes/token "
        "| checkpoints | peak RSS MB | peak RSS above loaded model MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        read, restore = row["read"], row.get("restore")
        restore_s = f"{restore['seconds']:.2f}" if restore else ""
        ratio = f"{read['seconds'] / restore['seconds']:.0f}x" if restore else ""
        lines.append(
            f"| {read['tokens']:,} | {read['seconds']:.1f} | {read['tokens'] / read['seconds']:,.0f} | {restore_s} "
            f"| {ratio} | {read['snapshot_bytes'] / 1e6:.1f} | {read['snapshot_bytes'] / read['tokens']:,.0f} "
            f"| {read['checkpoints']} | {read['peak_rss_mb']:.0f} | {read['peak_rss_mb'] - read['rss_after_load_mb']:.0f} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--restore-tokens", type=int, default=100_000, help="document length for read-against-restore (default: 100000)"
    )
    parser.add_argument(
        "--memory-tokens",
        default="25000,50000,100000,200000",
        help="comma-separated document lengths for peak memory (default: 25000,50000,100000,200000)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")


def main(args: argparse.Namespace) -> int:
    try:
        memory_tokens = [int(t) for t in args.memory_tokens.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--memory-tokens must be comma-separated integers, got {args.memory_tokens!r}") from None
    if args.restore_tokens <= 0 or any(t <= 0 for t in memory_tokens):
        raise UserError("document lengths must be positive")
    result = run_session_benchmark(
        args.restore_tokens, memory_tokens, log=lambda line: print(line, file=sys.stderr, flush=True)
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown_table(result))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2:])
