"""Before and after on this CPU: the same measurements on an earlier commit and on the working tree,
in alternating processes, so that both meet the same load on a shared machine.

    python packaging/bench/cpu/ab.py --base 2d1479e --rounds 6 --json ab.json

The earlier commit is exported (git archive) to a temporary folder and imported from there
(PYTHONPATH before the installed package). Each round runs one process per side, alternating which
side goes first; every process loads the demo model the way `kimi-desk ingest` does (load_assistant,
`--quantize` as given, none by default, the dtype that side chooses on this CPU unless --dtype) and
measures, with nothing but the API both sides share:

- reading 8192 tokens after 2048 read for real (chunks of the assistant's prefill_chunk), and one
  chunk after 32768 cached tokens (a synthetic cache: random latents);
- decode steps after 1024 and 214000 cached tokens (synthetic), median of 16;
- the first token of a question after 214000 cached tokens: restore from a snapshot folder written
  once per side, as a reading writes it (in the page cache), copy the state, prefill the question, first step;
- peak resident memory.

The report gives each measurement's best and median over the rounds, per side, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The environment as given, before cpu_bench's import of kimi_desk sets how OpenMP's threads wait
# (engine/cpu_threads.py `choose_wait`): each side's worker decides that as its own code does.
GIVEN_ENVIRONMENT = dict(os.environ)

from cpu_bench import write_snapshot  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
QUESTION = "Where is the configuration parsed, and what happens when a key is missing?"
LONG = 214000


def _synthetic(model, cached: int):
    """A fresh state with `cached` random latents in every MLA cache (MLACache's reserve, buffer and
    length exist on both sides)."""
    import torch

    state = model.new_state(1)
    generator = torch.Generator().manual_seed(0)
    for layer in state.layers:
        if hasattr(layer, "reserve"):
            layer.reserve(cached + 1)
            for a in range(0, cached, 65536):
                b = min(cached, a + 65536)
                layer.buffer[0, a:b] = torch.randn(b - a, layer.buffer.shape[-1], generator=generator).to(layer.buffer)
            layer.length = cached
    state.position = cached
    return state


def worker(snapshot: str, dtype: str | None, quantize: str) -> dict:
    import torch

    from kimi_desk.engine import chat
    from kimi_desk.engine.generate import GREEDY, decode_step_function, stream_tokens
    from kimi_desk.engine.loading import DEMO_MODEL, load_assistant
    from kimi_desk.engine.snapshot import SnapshotStore

    torch.manual_seed(0)
    assistant = load_assistant(DEMO_MODEL, "cpu", quantize, **({"dtype": getattr(torch, dtype)} if dtype else {}))
    model, chunk = assistant.model, assistant.prefill_chunk
    result = dict(dtype=str(model.dtype).removeprefix("torch."), threads=torch.get_num_threads())
    ids = torch.randint(0, model.config.vocab_size, (1, 10240), generator=torch.Generator().manual_seed(0))
    state = model.new_state(1)
    model(ids[:, :2048], state, last_only=True)
    started = time.perf_counter()
    for a in range(2048, 10240, chunk):
        model(ids[:, a : a + chunk], state, last_only=True)
    result["read 8192 after 2048, tok/s"] = 8192 / (time.perf_counter() - started)
    state = _synthetic(model, 32768)
    started = time.perf_counter()
    model(ids[:, :chunk], state, last_only=True)
    result[f"read {chunk} after 32768, tok/s"] = chunk / (time.perf_counter() - started)
    for cached in (1024, LONG):
        state = _synthetic(model, cached)
        decode = decode_step_function(model, state, assistant.tokenizer.vocab_size)
        token, steps = 5, []
        for _ in range(17):
            started = time.perf_counter()
            token = decode(token)
            steps.append(time.perf_counter() - started)
        result[f"decode after {cached}, tok/s"] = 1 / statistics.median(steps[1:])
    del state, decode
    if not (Path(snapshot) / "manifest.json").exists():
        write_snapshot(assistant, Path(snapshot), LONG)
    started = time.perf_counter()
    document = SnapshotStore(Path(snapshot), assistant.identity).restore(LONG, model.new_state(1))
    restored = time.perf_counter()
    question = document.clone()
    cloned = time.perf_counter()
    next(
        stream_tokens(
            model,
            chat.question_ids(assistant.tokenizer, QUESTION),
            question,
            max_new_tokens=1,
            sampling=GREEDY,
            stop_token_ids=(),
            prefill_chunk_size=chunk,
            vocab_size=assistant.tokenizer.vocab_size,
        )
    )
    done = time.perf_counter()
    result.update(
        {
            "first token after 214000: restore s": restored - started,
            "first token: state copy s": cloned - restored,
            "first token: question prefill + first step s": done - cloned,
            "first token: total s": done - started,
            "peak RSS MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    )
    return result


def _export(rev: str, into: Path) -> Path:
    """`rev` as an importable kimi_desk package under `into`; returns the folder for PYTHONPATH."""
    source, package = into / "src", into / "pkg" / "kimi_desk"
    source.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    package.mkdir(parents=True)
    (package / "__init__.py").write_bytes((source / "packaging" / "kimi_desk" / "__init__.py").read_bytes())
    for name in ("app", "engine", "kernels", "assets"):
        (package / name).symlink_to(source / name)
    return into / "pkg"


def _run(pythonpath: str | None, snapshot: Path, dtype: str | None, quantize: str) -> dict:
    env = dict(GIVEN_ENVIRONMENT)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--worker", str(snapshot), dtype or "", quantize],
            capture_output=True,
            text=True,
            env=env,
            cwd=cwd,
        )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "worker failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the earlier commit")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 on both sides (default: each side's own)")
    parser.add_argument("--quantize", default="none", help="the weight format on both sides (default none)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kimi-desk-ab-") as tmp:
        base = _export(args.base, Path(tmp) / "base")
        snapshot = Path(tmp) / "snapshot"
        snapshot.mkdir()
        runs = {"before": [], "after": []}
        loads = []
        for round_ in range(args.rounds):
            order = [("before", str(base)), ("after", None)]
            for side, path in order if round_ % 2 == 0 else order[::-1]:
                loads.append(_load())
                (snapshot / side).mkdir(exist_ok=True)
                runs[side].append(_run(path, snapshot / side, args.dtype, args.quantize))
                print(f"round {round_ + 1} {side}: {json.dumps(runs[side][-1])}", file=sys.stderr, flush=True)
    keys = [k for k in runs["after"][0] if isinstance(runs["after"][0][k], float)]
    lines = [
        f"{args.base} (before) against the working tree (after), --quantize {args.quantize}, {args.rounds} rounds "
        "of alternating processes; "
        f"dtype {runs['before'][0]['dtype']} / {runs['after'][0]['dtype']}; load average before each process: "
        f"{' | '.join(loads)}.",
        "",
        "| measurement | before: best | before: median | after: best | after: median | after / before (medians) |",
        "|---|---|---|---|---|---|",
    ]
    for key in keys:
        higher_is_better = "tok/s" in key
        values = {side: [r[key] for r in runs[side]] for side in runs}
        best = {side: (max if higher_is_better else min)(v) for side, v in values.items()}
        median = {side: statistics.median(v) for side, v in values.items()}
        lines.append(
            f"| {key} | {best['before']:,.2f} | {median['before']:,.2f} | {best['after']:,.2f} | "
            f"{median['after']:,.2f} | {median['after'] / median['before']:.2f} |"
        )
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(dict(base=args.base, loads=loads, runs=runs), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], sys.argv[3] or None, sys.argv[4])))
    else:
        sys.exit(main())
