"""What a question in a thread costs in memory after a long document (`kimi-desk bench threads`).

A thread continues the document's state in place (engine/session.py): asking adds the thread's own
tokens and a fixed working set, never a copy of the document's cache. This measures it: a model with
random weights (at the 48B shapes on a GPU, all 27 layers, by default), a document state of `--context`
tokens filled with random cache rows and KDA states (what attention costs does not depend on their
values; nothing is read), then a new thread's question and a follow-up through `Assistant.ask`, each
under a peak-memory probe: torch's allocator statistics on a GPU, the resident set's high-water mark
(/proc/self/clear_refs, VmHWM) on the CPU. For comparison, the same probe around copying the document
state, which is what every question did before threads.

The figures: peak memory a question adds over the document state, next to the thread's own cache
rows; the rest is the fixed working set (the copied KDA state, activations, attention's partials).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

QUESTION = "Where is the configuration parsed, and which function validates it?"
FOLLOW_UP = "And where is that function called?"


@contextmanager
def peak_memory(device):
    """Yields a dict; on leaving, "added" holds the peak memory in the block beyond what was in use at
    its start (bytes)."""
    import torch

    result = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield result
        torch.cuda.synchronize()
        result["added"] = torch.cuda.max_memory_allocated() - base
        return
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    base = _proc_status("VmRSS")
    yield result
    result["added"] = _proc_status("VmHWM") - base


def _proc_status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def synthetic_session(assistant, store, tokens: int, seed: int = 0):
    """A session whose document state is `tokens` tokens of random cache rows and random KDA states,
    held by `assistant` in memory as if it had just read them."""
    import hashlib

    import torch

    from kimi_desk.engine.session import Segment
    from kimi_desk.engine.state import KDAState

    model = assistant.model
    session = store.create(f"/synthetic/{tokens}", f"synthetic {tokens:,}", assistant.identity, None)
    session.update(
        segments=[Segment("(synthetic)", hashlib.sha256(str(tokens).encode()).hexdigest(), 0, tokens)],
        read_position=tokens,
    )
    gen = torch.Generator(device=model.device).manual_seed(seed)
    state = model.new_state(1)
    state.reserve(assistant.cache_capacity(tokens))
    block = 1 << 16
    for layer in state.layers:
        if isinstance(layer, KDAState):
            layer.recurrent.normal_(0, 0.1, generator=gen)
            continue
        for start in range(0, tokens, block):  # in blocks: no temporary as large as the cache
            rows = torch.randn(
                1, min(block, tokens - start), layer.buffer.shape[-1], generator=gen, device=model.device
            ).to(layer.buffer.dtype)
            layer.append(rows)
    state.position = tokens
    assistant.hold_document_state(session, state)
    return session


def measure(
    assistant,
    store,
    context: int,
    new_tokens: int = 32,
    log=lambda line: None,
    questions: tuple[str, ...] = (QUESTION, FOLLOW_UP),
) -> dict:
    """The memory figures for one context length (see the module doc)."""
    import torch

    session = synthetic_session(assistant, store, context)
    document = assistant.document_state(session)
    config = assistant.model.config
    row_bytes = sum(
        layer.buffer.shape[-1] * layer.buffer.element_size() for layer in document.layers if hasattr(layer, "shared")
    )
    out = {
        "context": context,
        "kda_state_bytes": document.kda_nbytes,
        "mla_cache_bytes": document.mla_nbytes,
        "cache_row_bytes": row_bytes,
        "max_length": config.model_max_length,
        "questions": [],
    }
    storage = [layer.buffer.data_ptr() for layer in document.layers if hasattr(layer, "shared")]
    thread = None
    for question in questions:
        before = sum(t.tokens for t in session.threads if t.id == thread)
        with peak_memory(assistant.model.device) as peak:
            events = list(assistant.ask(session, question, thread=thread, max_new_tokens=new_tokens))
        thread = events[-1].thread
        tokens = session.thread(thread).tokens
        added = peak["added"]
        out["questions"].append(
            {
                "thread_tokens": tokens,
                "turn_tokens": tokens - before,
                "peak_added_bytes": added,
                "thread_rows_bytes": tokens * row_bytes,
                "working_set_bytes": added - tokens * row_bytes,
            }
        )
        log(f"context {context:,}: question with {tokens:,} thread tokens added {added / 2**20:,.1f} MiB")
    out["document_moved"] = storage != [
        layer.buffer.data_ptr() for layer in document.layers if hasattr(layer, "shared")
    ]
    with peak_memory(assistant.model.device) as peak:
        copy = document.clone()
    out["copy_added_bytes"] = peak["added"]
    del copy, document
    assistant.forget(session.id)
    if assistant.model.device.type == "cuda":
        torch.cuda.empty_cache()
    log(f"context {context:,}: copying the document state added {out['copy_added_bytes'] / 2**20:,.1f} MiB")
    return out


def build_assistant(config, device: str, dtype, seed: int = 0, quantize: str | None = None):
    """An Assistant on a random model of `config` (its large matrices in `quantize`, as loading would store
    them), with the small test tokenizer (its ids fit any vocabulary)."""
    import torch

    from kimi_desk.bench.random_checkpoint import random_model, write_small_tokenizer
    from kimi_desk.engine.fuse import fuse_projections
    from kimi_desk.engine.session import Assistant
    from kimi_desk.engine.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        write_small_tokenizer(folder)
        tokenizer = load_tokenizer(Path(folder))
    with torch.inference_mode():
        model = fuse_projections(random_model(config, seed=seed, dtype=dtype, device=device, quantize=quantize))
    return Assistant(model, tokenizer)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--contexts",
        default="131072,1000000",
        help="document lengths in tokens, comma-separated (default: 131072,1000000)",
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument(
        "--experts",
        type=int,
        default=None,
        help="routed experts per MoE layer (default: the 48B model's 256; fewer to fit a smaller card)",
    )
    parser.add_argument(
        "--small",
        action="store_true",
        help="a 4-layer model with the 48B cache width (576 values a token) instead of the 48B model: the CPU check",
    )
    parser.add_argument(
        "--quantize",
        choices=["none", "fp8", "int8", "int4"],
        default=None,
        help="the weights' format (default: fp8 on a GPU, as the 48B model runs on one card; none on the CPU)",
    )
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens of each answer (default 32)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")


def markdown_table(result: dict) -> str:
    mib = 2**20
    lines = [
        f"Thread memory ({result['model']}, {result['device']}, {result['date']}): peak memory a question adds "
        "over the document state, beside copying that state (what each question did before threads).",
        "",
        "| context | document state (KDA + MLA) | question: thread tokens | peak added | of which thread rows "
        "| fixed working set | copying the state |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        for q in r["questions"]:
            lines.append(
                f"| {r['context']:,} | {(r['kda_state_bytes'] + r['mla_cache_bytes']) / mib:,.0f} MiB | "
                f"{q['thread_tokens']:,} | {q['peak_added_bytes'] / mib:,.1f} MiB | "
                f"{q['thread_rows_bytes'] / mib:,.2f} MiB | {q['working_set_bytes'] / mib:,.1f} MiB | "
                f"{r['copy_added_bytes'] / mib:,.0f} MiB |"
            )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    import torch

    from kimi_desk.bench.random_checkpoint import kimi_linear_48b_config, tiny_config
    from kimi_desk.engine.session import SessionStore

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "kimi-desk: bench threads --device cuda needs a CUDA GPU (--device cpu --small runs the CPU check)",
            file=sys.stderr,
        )
        return 2
    contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    if args.small:
        config = tiny_config(
            vocab_size=1024, kv_lora_rank=512, qk_rope_head_dim=64, model_max_length=max(contexts) + 32768
        )
        label = "4 layers (K K K M), cache rows of the 48B width"
    else:
        config = kimi_linear_48b_config()
        label = "Kimi-Linear-48B-A3B shapes, 27 layers, random weights"
        if args.experts:
            config.num_experts = args.experts
            config.num_experts_per_token = min(config.num_experts_per_token, args.experts)
            label += f", {args.experts} experts per MoE layer"
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    quantize = args.quantize or ("fp8" if args.device == "cuda" else "none")
    label += f", {quantize} weights" if quantize != "none" else f", {str(dtype).removeprefix('torch.')} weights"
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    assistant = build_assistant(config, args.device, dtype, quantize=None if quantize == "none" else quantize)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result = {
        "model": label,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "date": datetime.date.today().isoformat(),
        "runs": [],
    }
    with tempfile.TemporaryDirectory() as home:
        store = SessionStore(Path(home))
        for context in contexts:
            result["runs"].append(measure(assistant, store, context, args.new_tokens, log))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(markdown_table(result))
    return 0
