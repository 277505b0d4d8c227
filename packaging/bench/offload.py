"""`kimi-desk bench model --gpu-memory 24GiB[,16GiB]`: the model under a GPU memory budget, the routed
experts that do not fit kept in RAM (engine/placement.py, engine/offload.py).

Per budget, the cap is the planner's and also PyTorch's per-process memory fraction, a hard limit: an
allocation past it fails instead of quietly using more. Random weights at the shapes of `--layers`
(27 for the whole model) in the format of `--quantize`, drawn on the GPU, the RAM experts moved out
one at a time. Reported: the placement, prefill tokens/s and the time to read the prefill's powers of
two (PCIe bytes per chunk streamed), decode ms/token at each context, eager and replaying the
recorded CUDA graph as generate() does (int4: the RAM experts read in place by the GPU, one graph; then,
as `cpu_only_*`, the same steps with the CPU computing them, graph pieces with the host's steps between),
each with its breakdown (time_eager_decode, time_graph_decode: the GPU's own time, the copies to and from
the host, the CPU's expert products, the host's wait for the GPU; experts and bytes over PCIe per token),
peak GPU (allocated and reserved) and peak RAM (the process's maximum resident set), and whether reading
`--read-tokens` fits the budget at all (the plan's answer).

Before the budgets, a check on the GPU: a small random model loaded whole and split between GPU and
RAM (int4, bf16, fp32): logits of a prefill (streamed experts) and of decode steps (int4: read in place;
bf16, fp32: CPU experts), and the split model's decode steps replayed from graphs against its eager ones.
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path


def _rel(a, b) -> float:
    return float(((a.double() - b.double()).norm() / b.double().norm()).item())


def check_offload(log) -> dict:
    """Split against whole on the GPU (module doc)."""
    import torch

    from kimi_desk.bench.random_checkpoint import tail7_config, write_random_checkpoint
    from kimi_desk.engine.cuda_graph import GraphDecoder
    from kimi_desk.engine.placement import Placement
    from kimi_desk.engine.weights import load_model

    gpu_experts = {1: (), 2: (0, 1, 2, 3), 3: (1, 4, 6), 4: (5,), 5: (0, 1, 2, 3, 4, 6, 7), 6: tuple(range(8))}
    plan = Placement(num_experts=8, gpu_experts=gpu_experts, fixed_bytes=0, expert_bytes=1, staging_bytes=0)
    ids = torch.randint(0, 512, (1, 300), generator=torch.Generator().manual_seed(7)).cuda()
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_checkpoint(tail7_config(moe_intermediate_size=64), Path(tmp) / "m", seed=4)
        for name, dtype, fmt in (
            ("fp32", torch.float32, None),
            ("bf16", torch.bfloat16, None),
            ("int4", torch.bfloat16, "int4"),
        ):
            logits = []
            for placement in (None, plan):
                model = load_model(path, device="cuda", dtype=dtype, quantize=fmt, placement=placement)
                state = model.new_state(1)
                prefill = model(ids[:, :280], state).float()
                decode = torch.cat([model(ids[:, t : t + 1], state) for t in range(280, 300)], 1).float()
                logits.append((prefill.cpu(), decode.cpu()))
                if placement is not None:
                    result[f"stats_{name}"] = model.offload.stats.to_dict()
                    state = model.new_state(1)
                    model(ids[:, :280], state)
                    decoder = GraphDecoder(model, state)
                    graph = torch.stack([decoder.step(ids[:, t : t + 1]).clone() for t in range(280, 300)])[None]
                    result[f"decode_graph_vs_eager_split_rel_err_{name}"] = _rel(graph.float().cpu(), decode.cpu())
                    result[f"graph_pieces_{name}"] = len(decoder.pieces)
                    del decoder, state
                del model
            (p_whole, d_whole), (p_split, d_split) = logits
            result[f"prefill_split_vs_whole_rel_err_{name}"] = _rel(p_split, p_whole)
            result[f"decode_split_vs_whole_rel_err_{name}"] = _rel(d_split, d_whole)
            result[f"decode_argmax_agree_{name}"] = float((d_split.argmax(-1) == d_whole.argmax(-1)).float().mean())
    log(f"offload check: {result}")
    return result


def time_budget(
    config,
    budget_text: str,
    quantize: str | None,
    prefill_tokens: int,
    contexts: list[int],
    chunk: int,
    read_tokens: list[int],
    log,
) -> dict:
    """One budget's figures (module doc)."""
    import torch

    from kimi_desk.bench.model import warm_state
    from kimi_desk.bench.random_checkpoint import random_model
    from kimi_desk.engine.fuse import fuse_projections
    from kimi_desk.engine.placement import PlacementError, parse_size, plan_placement

    budget = parse_size(budget_text, "--gpu-memory")
    row: dict = {"gpu_budget": budget_text, "gpu_budget_bytes": budget, "quantize": quantize}
    for tokens in read_tokens:
        try:
            fits = plan_placement(
                config, "bfloat16", quantize, gpu_budget=budget, context_tokens=tokens, prefill_chunk=chunk
            ).describe()
        except PlacementError as refused:
            fits = f"does not fit: {refused}"
        row[f"read_{tokens}_plan"] = fits
    context = max([*contexts, prefill_tokens])
    try:
        plan = plan_placement(
            config, "bfloat16", quantize, gpu_budget=budget, context_tokens=context, prefill_chunk=chunk
        )
    except PlacementError as refused:
        row["error"] = str(refused)
        log(f"budget {budget_text}: {refused}")
        return row
    row["placement"] = plan.to_dict()
    log(f"budget {budget_text}: {plan.describe()}")
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total))
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = fuse_projections(
        random_model(config, seed=0, dtype=torch.bfloat16, device="cuda", quantize=quantize, placement=plan)
    )
    row["build_s"] = time.perf_counter() - start
    stats = model.offload.stats if model.offload is not None else None
    log(
        f"budget {budget_text}: model built in {row['build_s']:.0f} s, "
        f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB on the GPU"
    )
    gen = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (1, prefill_tokens), device="cuda", generator=gen)
    model(ids[:, :chunk], model.new_state(1), last_only=True)  # compile the kernels
    if stats:
        stats.reset()
    state = model.new_state(1)
    torch.cuda.synchronize()
    start = time.perf_counter()
    marks, chunks = [], 0
    for a in range(0, prefill_tokens, chunk):
        model(ids[:, a : a + chunk], state, last_only=True)
        chunks += 1
        read = min(prefill_tokens, a + chunk)
        if read == prefill_tokens or (read >= 8192 and read & (read - 1) == 0):
            torch.cuda.synchronize()
            marks.append((read, time.perf_counter() - start))
            log(f"budget {budget_text}: read {read:,} tokens in {marks[-1][1]:.1f} s")
    row.update(
        prefill_tokens=prefill_tokens,
        prefill_s=marks[-1][1],
        prefill_tok_s=prefill_tokens / marks[-1][1],
        prefill_marks=marks,
        chunk=chunk,
        pcie_bytes_per_chunk=(stats.streamed_bytes / chunks) if stats else 0,
        prefill_stats=stats.to_dict() if stats else None,
    )
    del state
    row["decode"] = []
    for ctx in contexts:
        state, token = warm_state(model, ctx, ids[:, :1], gen)
        d = {"context": ctx, **time_eager_decode(model, state, token)}
        d.update(time_graph_decode(model, state, token))
        in_place = model.offload.in_place if model.offload is not None else None
        if in_place is not None:  # the same steps with every RAM expert on the CPU, for comparison
            model.offload.in_place = None
            d.update({f"cpu_only_{k}": v for k, v in time_graph_decode(model, state, token).items()})
            model.offload.in_place = in_place
        log(f"budget {budget_text}: decode at {ctx:,}: {d}")
        row["decode"].append(d)
        del state
    row["peak_gpu_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    row["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    del model
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1.0)
    return row


def time_eager_decode(model, state, token, steps: int = 20) -> dict:
    """Eager decode ms/token and, with experts in RAM, its breakdown from the offload stats (host timers):
    the CPU's expert products, the host's wait for the GPU's hand-over, PCIe bytes per token."""
    import torch

    stats = model.offload.stats if model.offload is not None else None
    if stats:
        stats.reset()
    start = time.perf_counter()
    for _ in range(steps):
        token = model(token, state)[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / steps * 1e3
    d = {"ms_per_token": ms, "tok_s": 1e3 / ms}
    if stats:
        cpu_ms, wait_ms = stats.cpu_seconds / steps * 1e3, stats.wait_seconds / steps * 1e3
        d.update(
            cpu_expert_ms=cpu_ms,
            host_wait_ms=wait_ms,
            other_ms=ms - cpu_ms - wait_ms,
            pcie_bytes_per_token=(stats.d2h_bytes + stats.h2d_bytes) / steps,
        )
    return d


def time_graph_decode(model, state, token, steps: int = 20) -> dict:
    """Decode replaying the recorded pieces (engine/cuda_graph.py), as generate() does; `graph_` keys:
    ms/token; the GPU's own time per token (the pieces replayed back to back with no host step between,
    CUDA events; the copies to and from the host included); of it, the copies alone (one graph of every
    split layer's round-trip copies, CUDA events); the CPU's expert products and the host's wait for the
    GPU (host timers, offload stats); host_other_ms, the rest of the host's time (launches, waking up);
    with the RAM experts read by the GPU (engine/offload.py's InPlaceDecode), per token: those read over
    the bus on the choice, those gathered ahead on the guess, those of the choice found gathered, and the
    bytes over PCIe (the first two).
    The back-to-back replays leave the state meaningless: the last thing done with it."""
    from kimi_desk.bench.model import chained_ms_per_token, chained_replays
    from kimi_desk.engine.cuda_graph import GraphDecoder

    decoder = GraphDecoder(model, state)
    token = chained_replays(decoder, token, 3)
    stats = model.offload.stats if model.offload is not None else None
    in_place = model.offload.in_place if model.offload is not None else None
    if stats:
        stats.reset()
    if in_place is not None:
        in_place.take_counts()
    ms, token = chained_ms_per_token(decoder, token, steps)
    counts = in_place.take_counts() if in_place is not None else None
    d = {
        "graph_ms_per_token": ms,
        "graph_tok_s": 1e3 / ms,
        "graph_pieces": len(decoder.pieces),
        "graph_gpu_ms": _events_ms(lambda: [graph.replay() for graph, _ in decoder.pieces], steps),
    }
    if stats is not None:
        cpu_ms, wait_ms = stats.cpu_seconds / steps * 1e3, stats.wait_seconds / steps * 1e3
        d.update(
            # The host round trip's copies; none when the RAM experts are read in place.
            graph_transfer_ms=0.0 if in_place is not None else round_trip_copies_ms(model, steps),
            graph_cpu_expert_ms=cpu_ms,
            graph_host_wait_ms=wait_ms,
            graph_host_other_ms=ms - cpu_ms - wait_ms,
        )
    if counts is not None:
        d.update(
            graph_read_in_place_per_token=counts["read_in_place"] / steps,
            graph_gathered_per_token=counts["gathered"] / steps,
            graph_found_per_token=counts["found"] / steps,
            graph_pcie_bytes_per_token=(counts["read_in_place"] + counts["gathered"]) * in_place.expert_bytes / steps,
        )
    return d


def round_trip_copies_ms(model, steps: int) -> float:
    """GPU time of one token's copies to and from the host buffers of every split layer, recorded as one
    graph of those copies alone (the decode step's pieces hold them among their kernels)."""
    import torch

    from kimi_desk.engine.offload import offloaded_layers

    layers = [layer for layer in offloaded_layers(model) if layer._host is not None]
    if not layers:
        return 0.0
    host = layers[0]._host
    x = torch.zeros(1, host.x.shape[-1], dtype=host.x.dtype, device="cuda")
    rows = torch.zeros(1, host.rows.shape[-1], dtype=host.rows.dtype, device="cuda")
    weights = torch.zeros(1, host.weights.shape[-1], dtype=host.weights.dtype, device="cuda")
    out = torch.zeros(1, host.out.shape[-1], dtype=host.out.dtype, device="cuda")
    graph = torch.cuda.CUDAGraph()
    # The host buffers were made during decode, under inference mode: only inference mode writes them.
    with torch.inference_mode(), torch.cuda.graph(graph):
        for layer in layers:
            h = layer._host
            h.x[:1].copy_(x, non_blocking=True)
            h.rows[:1].copy_(rows, non_blocking=True)
            h.weights[:1].copy_(weights, non_blocking=True)
            out.copy_(h.out[:1], non_blocking=True)
    return _events_ms(graph.replay, steps)


def _events_ms(run, steps: int) -> float:
    """ms per call of `run` (GPU work on the current stream), by CUDA events around `steps` calls."""
    import torch

    run()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(steps):
        run()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / steps
