"""The whole engine on the CPU, as a user runs it, in each weight format: reading, answering, memory.

    kimi-desk bench cpu                                        # the embedded demo model; none, int8, int4
    kimi-desk bench cpu --model PATH --formats none --json r.json
    kimi-desk bench cpu --llama-cpp .bench/llama-cpu           # llama.cpp on the same checkpoint, same run
    python packaging/bench/cpu/cpu_bench.py --help             # the same, from a source checkout

Per format, in a child process of its own (so that its peak resident memory is that format's), the model
is loaded the way `kimi-desk ingest` and `ask` load it (engine/loading.py: the CPU's default dtype, fused
projections, int4 in PyTorch's CPU layout) and measured:

- reading: `START+TOKENS` reads TOKENS tokens after START, in the assistant's prefill calls (2048 tokens
  on the CPU). The START tokens are read for real up to 8192; longer starts use a synthetic state (random
  latents in the MLA caches: attention costs the same whatever the cached values). Best of --repeats.
- answering: decode tokens/s after a synthetic cache of each --decode-at size (one token at a time
  through the engine's decode path, greedy); and the first token of a question after --question-after
  cached tokens: restoring the state from a snapshot written the way a reading writes it (its files in
  the page cache: a cold disk adds its read time), the per-question copy of the state, the question's
  prefill and the first decode step.
- memory: resident set after loading, and its peak over the whole run.

Threads: ours as `kimi-desk` chooses them (engine/cpu_threads.py: the cores idle when the model loads),
or --threads for every process.

With --llama-cpp DIR (a build of packaging/bench/llama_cpp/build.sh), llama.cpp reads and decodes the
same checkpoint converted to GGUF, bf16 / Q8_0 / Q4_K_M beside none / int8 / int4, at the same lengths
and depths, on --threads (default every core, as llama-bench does), each file in its own process, its
columns beside ours in the one table (llama_cpp_side.py). With --transformers, transformers' native Kimi
Linear (its pure-PyTorch path, float32) reads 2048+8192 and decodes on the same checkpoint, in its own
process: the baseline a user would otherwise pick. Timings are wall-clock on whatever else the machine
runs: the load average is recorded beside them.
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

DEFAULT_PREFILL = "0+2048,2048+8192,32768+2048,131072+2048"
DEFAULT_DECODE_AT = "1024,32768,214000"
DEFAULT_QUESTION_AFTER = 214000
QUESTION = "Where is the configuration parsed, and what happens when a key is missing?"
REPO = Path(__file__).resolve().parents[3]
# Starts up to this many tokens are read for real; longer ones start from a synthetic state.
REAL_START_MAX = 8192


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _pairs(text: str) -> list[tuple[int, int]]:
    pairs = []
    for item in text.split(","):
        start, _, tokens = item.strip().partition("+")
        if not start.isdigit() or not tokens.isdigit() or int(tokens) < 1:
            raise UserError(f"--prefill takes START+TOKENS items, got {item!r}")
        pairs.append((int(start), int(tokens)))
    return pairs


def _sizes(text: str, option: str) -> list[int]:
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"{option} takes comma-separated token counts, got {text!r}") from None
    if not sizes or any(s < 0 for s in sizes):
        raise UserError(f"{option} needs at least one count, none negative")
    return sizes


# -- one format, in its own process -------------------------------------------------------------------


def _state_after(assistant, ids, start: int):
    """The state after `start` tokens: read for real when short, else synthetic."""
    from kimi_desk.engine.reading_time import state_with_cache

    model = assistant.model
    if start > REAL_START_MAX:
        return state_with_cache(model, start)
    state = model.new_state(1)
    for a in range(0, start, assistant.prefill_chunk):
        model(ids[:, a : min(start, a + assistant.prefill_chunk)], state, last_only=True)
    return state


def _reading(assistant, start: int, tokens: int, repeats: int) -> dict:
    import torch

    model = assistant.model
    ids = torch.randint(0, model.config.vocab_size, (1, start + tokens), generator=torch.Generator().manual_seed(0))
    base = _state_after(assistant, ids, start)
    seconds = []
    for _ in range(repeats):
        state = base.clone()
        started = time.perf_counter()
        for a in range(start, start + tokens, assistant.prefill_chunk):
            model(ids[:, a : min(start + tokens, a + assistant.prefill_chunk)], state, last_only=True)
        seconds.append(time.perf_counter() - started)
    return dict(start=start, tokens=tokens, seconds=min(seconds), tok_s=tokens / min(seconds), all_seconds=seconds)


def _decoding(assistant, cached: int, steps: int) -> dict:

    from kimi_desk.engine.generate import decode_step_function
    from kimi_desk.engine.reading_time import state_with_cache

    state = state_with_cache(assistant.model, cached)
    decode = decode_step_function(assistant.model, state, assistant.tokenizer.vocab_size)
    token, seconds = 5, []
    for _ in range(steps + 1):  # the first step warms up
        started = time.perf_counter()
        token = decode(token)
        seconds.append(time.perf_counter() - started)
    seconds = sorted(seconds[1:])
    decoder = getattr(decode, "decoder", None)
    if decoder is None:
        how = "the model's modules"
    else:
        how = "replayed" if decoder.not_replayable is None else f"the model's modules ({decoder.not_replayable})"
    return dict(
        how=how,
        cached=cached,
        steps=steps,
        tok_s_best=1 / seconds[0],
        tok_s_median=1 / seconds[len(seconds) // 2],
        ms_median=1000 * seconds[len(seconds) // 2],
    )


def write_snapshot(assistant, folder: Path, cached: int):
    """A snapshot folder of `cached` tokens of random latents, written the way a reading writes one: a
    checkpoint every checkpoint_interval tokens, the MLA segments between them. Returns its store."""
    import torch

    from kimi_desk.engine.snapshot import SnapshotStore

    store = SnapshotStore(folder, assistant.identity)
    state, generator = assistant.model.new_state(1), torch.Generator().manual_seed(0)
    for end in list(range(assistant.checkpoint_interval, cached, assistant.checkpoint_interval)) + [cached]:
        for layer in state.layers:
            if hasattr(layer, "append"):
                fresh = torch.randn(1, end - layer.length, layer.buffer.shape[-1], generator=generator)
                layer.append(fresh.to(layer.buffer.dtype))
        state.position = end
        store.save(state)
    return store


def _first_token(assistant, cached: int, folder: Path) -> dict:
    """Restore a snapshot of `cached` tokens written as a reading writes it, then do what `ask` does up
    to its first token: copy the document's state, prefill the question, sample, feed the token."""
    from kimi_desk.engine import chat
    from kimi_desk.engine.generate import GREEDY, stream_tokens
    from kimi_desk.engine.snapshot import SnapshotStore

    model = assistant.model
    store = write_snapshot(assistant, folder, cached)
    started = time.perf_counter()
    document = SnapshotStore(folder, assistant.identity).restore(cached, model.new_state(1))
    restored = time.perf_counter()
    state = document.clone()
    cloned = time.perf_counter()
    prompt = chat.question_ids(assistant.tokenizer, QUESTION)
    next(
        stream_tokens(
            model,
            prompt,
            state,
            max_new_tokens=1,
            sampling=GREEDY,
            stop_token_ids=(),
            prefill_chunk_size=assistant.prefill_chunk,
            vocab_size=assistant.tokenizer.vocab_size,
        )
    )
    done = time.perf_counter()
    return dict(
        cached=cached,
        question_tokens=len(prompt),
        restore_s=restored - started,
        clone_s=cloned - restored,
        prefill_and_first_step_s=done - cloned,
        total_s=done - started,
        snapshot_files=len(store.files),
        snapshot_mb=store.nbytes() / 1e6,
    )


def _worker(options: dict) -> dict:
    import torch

    from kimi_desk.engine.loading import load_assistant

    torch.manual_seed(0)
    if options["threads"]:
        os.environ["KIMI_DESK_THREADS"] = str(options["threads"])
    started = time.perf_counter()
    assistant = load_assistant(Path(options["model"]), "cpu", options["format"])
    result = dict(
        format=options["format"],
        dtype=str(assistant.model.dtype).removeprefix("torch."),
        load_s=time.perf_counter() - started,
        rss_after_load_mb=_rss_mb(),
        threads=torch.get_num_threads(),
    )
    result["reading"] = [_reading(assistant, s, t, options["repeats"]) for s, t in options["prefill"]]
    result["decoding"] = [_decoding(assistant, c, options["decode_steps"]) for c in options["decode_at"]]
    if options["question_after"]:
        with tempfile.TemporaryDirectory(prefix="kimi-desk-bench-snapshot-") as folder:
            result["first_token"] = _first_token(assistant, options["question_after"], Path(folder))
    result["peak_rss_mb"] = _rss_mb()
    return result


def _transformers_worker(options: dict) -> dict:
    # transformers binds fla's Triton kernels when fla is importable; block it to get the pure-PyTorch path.
    sys.modules["fla"] = None
    import torch
    import transformers

    if options["threads"]:
        torch.set_num_threads(options["threads"])
    model = transformers.AutoModelForCausalLM.from_pretrained(options["model"], dtype=torch.float32).eval()
    after_load = _rss_mb()
    ids = torch.randint(0, model.config.vocab_size, (1, 2048 + 8192), generator=torch.Generator().manual_seed(0))
    cache, seconds = None, 0.0
    with torch.no_grad():
        for a in range(0, ids.shape[1], 2048):
            started = time.perf_counter()
            out = model(ids[:, a : a + 2048], past_key_values=cache, use_cache=True, logits_to_keep=1)
            if a:
                seconds += time.perf_counter() - started
            cache = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        steps = []
        for _ in range(options["decode_steps"]):
            started = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            steps.append(time.perf_counter() - started)
    steps.sort()
    return dict(
        format="transformers",
        dtype="float32",
        reading=[dict(start=2048, tokens=8192, seconds=seconds, tok_s=8192 / seconds)],
        decoding=[
            dict(
                cached=2048 + 8192,
                steps=len(steps),
                tok_s_best=1 / steps[0],
                tok_s_median=1 / steps[len(steps) // 2],
                ms_median=1000 * steps[len(steps) // 2],
            )
        ],
        rss_after_load_mb=after_load,
        peak_rss_mb=_rss_mb(),
        threads=torch.get_num_threads(),
    )


def _run_worker(kind: str, options: dict) -> dict:
    """One measurement process; its working folder is a temporary one, so that nothing in the current
    folder (a source checkout's kernels/, say) shadows a package it imports."""
    with tempfile.TemporaryDirectory(prefix="kimi-desk-bench-") as cwd:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--worker", kind, json.dumps(options)],
            capture_output=True,
            text=True,
            cwd=cwd,
        )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(format=options.get("format", kind), error=last)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the run and its report ------------------------------------------------------------------------


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    from kimi_desk.engine.memory import cpu_has_fast_bf16
    from kimi_desk.kernels.quant.avx2 import quantized_backend

    bf16 = "bf16 in hardware" if cpu_has_fast_bf16() else "no bf16 hardware"
    return f"{cpu}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}, {bf16}; {quantized_backend()}"


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _llama_cpp_side():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import llama_cpp_side

    return llama_cpp_side


def run(
    model: Path,
    formats: list[str],
    options: dict,
    transformers: bool,
    llama_cpp: Path | None = None,
    gguf_folder: Path | None = None,
    log=print,
) -> dict:
    import torch

    from kimi_desk.engine.weights import checkpoint_fingerprint

    ggufs = {}
    if llama_cpp is not None:
        side = _llama_cpp_side()
        ggufs = side.gguf_files(model, checkpoint_fingerprint(model), llama_cpp, gguf_folder, formats, log)
    results, loads = [], [_load()]
    for fmt in formats:
        results.append(_run_worker("engine", dict(options, model=str(model), format=fmt)))
        loads.append(_load())
        log(f"{fmt}: {_summary(results[-1])}")
        if fmt in ggufs:
            results.append(
                _run_worker(
                    "llama.cpp",
                    dict(
                        options, llama_cpp=str(llama_cpp.resolve()), gguf=str(ggufs[fmt]), gguf_type=side.GGUF_TYPE[fmt]
                    ),
                )
            )
            loads.append(_load())
            log(f"llama.cpp {side.GGUF_TYPE[fmt]}: {_summary(results[-1])}")
    if transformers:
        results.append(_run_worker("transformers", dict(options, model=str(model))))
        loads.append(_load())
        log(f"transformers: {_summary(results[-1])}")
    return dict(
        benchmark="cpu",
        date=datetime.datetime.now().isoformat(timespec="minutes"),
        machine=_machine(),
        torch=torch.__version__,
        model=str(model),
        load_average=loads,
        options=options,
        results=results,
    )


def _summary(r: dict) -> str:
    if "error" in r:
        return f"failed: {r['error']}"
    reading = ", ".join(f"{x['tokens']} after {x['start']}: {x['tok_s']:.0f} tok/s" for x in r["reading"])
    return f"reading {reading}; peak RSS {r['peak_rss_mb']:.0f} MB"


def markdown(result: dict) -> str:
    rows = [r for r in result["results"] if "error" not in r]
    lines = [
        f"CPU: {result['machine']}, torch {result['torch']}, {result['date']}; model {result['model']}; "
        f"load average (1, 5, 15 min) before and after each column: "
        f"{' | '.join(result['load_average'])}.",
        "",
    ]
    lines.append("| measurement | " + " | ".join(f"{r['format']} ({r.get('dtype', 'float32')})" for r in rows) + " |")
    lines.append("|---" * (len(rows) + 1) + "|")

    def row(label, cell):
        lines.append(f"| {label} | " + " | ".join(cell(r) for r in rows) + " |")

    readings = sorted({(x["start"], x["tokens"]) for r in rows for x in r["reading"]})
    for start, tokens in readings:

        def reading_cell(r, start=start, tokens=tokens):
            found = [x for x in r["reading"] if (x["start"], x["tokens"]) == (start, tokens)]
            return f"{found[0]['tok_s']:,.0f}" if found else ""

        row(f"reading tok/s, {tokens:,} after {start:,}", reading_cell)
    for cached in sorted({x["cached"] for r in rows for x in r["decoding"]}):

        def decode_cell(r, cached=cached):
            found = [x for x in r["decoding"] if x["cached"] == cached]
            return f"{found[0]['tok_s_median']:.1f} ({found[0]['tok_s_best']:.1f})" if found else ""

        row(f"decode tok/s after {cached:,}, median (best)", decode_cell)
    if any(x.get("how") for r in rows for x in r["decoding"]):
        # How our decode step ran (engine/cpu_replay.py): replayed from its recording, or why not.
        row("decode step", lambda r: r["decoding"][0].get("how", "") if r["decoding"] else "")
    if any("first_token" in r for r in rows):

        def first_cell(r, key):
            f = r.get("first_token")
            return f"{f[key]:.2f}" if f else ""

        cached = next(r["first_token"]["cached"] for r in rows if "first_token" in r)
        row(f"first token after {cached:,}: restore s", lambda r: first_cell(r, "restore_s"))
        row("first token: state copy s", lambda r: first_cell(r, "clone_s"))
        row("first token: question prefill + first step s", lambda r: first_cell(r, "prefill_and_first_step_s"))
        row("first token: total s", lambda r: first_cell(r, "total_s"))
    row("threads", lambda r: str(r.get("threads", "")))
    row("load s", lambda r: f"{r['load_s']:.1f}" if "load_s" in r else "")
    row("RSS after load MB", lambda r: f"{r['rss_after_load_mb']:.0f}" if "rss_after_load_mb" in r else "")
    row("peak RSS MB", lambda r: f"{r['peak_rss_mb']:.0f}")
    if any("gguf_mb" in r for r in rows):
        row("GGUF file MB", lambda r: f"{r['gguf_mb']:.1f}" if "gguf_mb" in r else "")
    notes = [
        f"llama.cpp {r['dtype']}: not run (deeper than --llama-max-depth): {', '.join(r['left_out'])}"
        for r in rows
        if r.get("left_out")
    ]
    lines += [""] + notes if notes else []
    failed = [r for r in result["results"] if "error" in r]
    lines += [""] + [f"{r['format']} failed: {r['error']}" for r in failed] if failed else []
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", type=Path, default=None, help="a checkpoint folder (default: the embedded demo model)"
    )
    parser.add_argument(
        "--formats",
        default="none,int8,int4",
        help="weight formats to compare, each in its own process (default: none,int8,int4)",
    )
    parser.add_argument(
        "--prefill", default=DEFAULT_PREFILL, help=f"readings to time, START+TOKENS each (default: {DEFAULT_PREFILL})"
    )
    parser.add_argument(
        "--decode-at", default=DEFAULT_DECODE_AT, help=f"cache sizes to decode after (default: {DEFAULT_DECODE_AT})"
    )
    parser.add_argument("--decode-steps", type=int, default=16, help="decode steps timed at each size (default: 16)")
    parser.add_argument(
        "--question-after",
        type=int,
        default=DEFAULT_QUESTION_AFTER,
        help=f"cached tokens before the first-token measurement, 0 to skip (default: {DEFAULT_QUESTION_AFTER})",
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="times each reading is timed, the best kept (default: 2)"
    )
    parser.add_argument(
        "--transformers",
        action="store_true",
        help="also transformers' native Kimi Linear, pure PyTorch, float32 (needs the dev extra)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for every measured process, ours and llama.cpp's (default: ours choose as `kimi-desk` does, "
        "the cores idle at load time; llama.cpp takes every core, as llama-bench does)",
    )
    parser.add_argument(
        "--llama-cpp",
        type=Path,
        default=None,
        metavar="DIR",
        help="also llama.cpp, from this build (packaging/bench/llama_cpp/build.sh's output), on the same "
        "checkpoint as GGUF: bf16, Q8_0, Q4_K_M beside none, int8, int4",
    )
    parser.add_argument(
        "--gguf-dir",
        type=Path,
        default=REPO / ".bench" / "gguf",
        help="where the converted GGUF files are kept and reused (default: the checkout's .bench/gguf)",
    )
    parser.add_argument(
        "--llama-max-depth",
        type=int,
        default=32768,
        help="llama.cpp prefills a depth for real before every repetition: deeper readings and "
        "decodes are left out on its side (default: 32768)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")


def main(args: argparse.Namespace) -> int:
    from kimi_desk.engine.cpu_threads import usable_cores
    from kimi_desk.engine.loading import DEMO_MODEL, QUANTIZE_CHOICES

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if not formats or any(f not in QUANTIZE_CHOICES for f in formats):
        raise UserError(f"--formats takes some of {', '.join(QUANTIZE_CHOICES)}, got {args.formats!r}")
    if args.decode_steps < 1 or args.repeats < 1 or args.question_after < 0:
        raise UserError("--decode-steps and --repeats must be at least 1, --question-after at least 0")
    if args.threads is not None and args.threads < 1:
        raise UserError("--threads must be at least 1")
    if args.llama_cpp is not None:
        missing = _llama_cpp_side().check_build(args.llama_cpp)
        if missing:
            raise UserError(missing)
    if args.transformers:
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise UserError("--transformers needs transformers (pip install 'kimi-desk[dev]')") from None
    options = dict(
        prefill=_pairs(args.prefill),
        decode_at=_sizes(args.decode_at, "--decode-at"),
        decode_steps=args.decode_steps,
        question_after=args.question_after,
        repeats=args.repeats,
        threads=args.threads,
        llama_threads=args.threads or usable_cores(),
        llama_max_depth=args.llama_max_depth,
    )
    result = run(
        args.model or DEMO_MODEL,
        formats,
        options,
        args.transformers,
        args.llama_cpp,
        args.gguf_dir,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return 0 if all("error" not in r for r in result["results"]) else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, options = sys.argv[2], json.loads(sys.argv[3])
        workers = dict(
            engine=_worker, transformers=_transformers_worker, **{"llama.cpp": lambda o: _llama_cpp_side().worker(o)}
        )
        print(json.dumps(workers[kind](options)))
    else:
        parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
        add_arguments(parser)
        sys.exit(main(parser.parse_args()))
