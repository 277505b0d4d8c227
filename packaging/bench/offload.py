"""`kimi-desk bench model --gpu-memory 24GiB[,16GiB]`: the model under a GPU memory budget, the routed
experts that do not fit kept in RAM (engine/placement.py, engine/offload.py).

Per budget, the cap is the planner's and also PyTorch's per-process memory fraction, a hard limit: an
allocation past it fails instead of quietly using more. Random weights at the shapes of `--layers`
(27 for the whole model) in the format of `--quantize`, drawn on the GPU, the RAM experts moved out
one at a time. Reported: the placement, prefill tokens/s and the time to read the prefill's powers of
two (PCIe bytes per chunk streamed), eager decode ms/token at each context with its breakdown (the
CPU's expert products, the host's wait for the GPU's router, bytes over PCIe per token), peak GPU
(allocated and reserved) and peak RAM (the process's maximum resident set), and whether reading
`--read-tokens` fits the budget at all (the plan's answer).

Before the budgets, a check on the GPU: a small random model loaded whole and split between GPU and
RAM (int4, bf16, fp32): logits of a prefill (streamed experts) and of decode steps (CPU experts).
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

    from kimi_desk.engine.placement import Placement
    from kimi_desk.bench.random_checkpoint import tail7_config, write_random_checkpoint
    from kimi_desk.engine.weights import load_model

    gpu_experts = {1: (), 2: (0, 1, 2, 3), 3: (1, 4, 6), 4: (5,), 5: (0, 1, 2, 3, 4, 6, 7), 6: tuple(range(8))}
    plan = Placement(num_experts=8, gpu_experts=gpu_experts, fixed_bytes=0, expert_bytes=1, staging_bytes=0)
    ids = torch.randint(0, 512, (1, 300), generator=torch.Generator().manual_seed(7)).cuda()
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_checkpoint(tail7_config(moe_intermediate_size=64), Path(tmp) / "m", seed=4)
        for name, dtype, fmt in (("fp32", torch.float32, None), ("bf16", torch.bfloat16, None),
                                 ("int4", torch.bfloat16, "int4")):
            logits = []
            for placement in (None, plan):
                model = load_model(path, device="cuda", dtype=dtype, quantize=fmt, placement=placement)
                state = model.new_state(1)
                prefill = model(ids[:, :280], state).float()
                decode = torch.cat([model(ids[:, t : t + 1], state) for t in range(280, 300)], 1).float()
                logits.append((prefill.cpu(), decode.cpu()))
                if placement is not None:
                    result[f"stats_{name}"] = model.offload.stats.to_dict()
                del model
            (p_whole, d_whole), (p_split, d_split) = logits
            result[f"prefill_split_vs_whole_rel_err_{name}"] = _rel(p_split, p_whole)
            result[f"decode_split_vs_whole_rel_err_{name}"] = _rel(d_split, d_whole)
            result[f"decode_argmax_agree_{name}"] = float((d_split.argmax(-1) == d_whole.argmax(-1)).float().mean())
    log(f"offload check: {result}")
    return result


def time_budget(config, budget_text: str, quantize: str | None, prefill_tokens: int, contexts: list[int],
                chunk: int, read_tokens: list[int], log) -> dict:
    """One budget's figures (module doc)."""
    import torch

    from kimi_desk.engine.fuse import fuse_projections
    from kimi_desk.engine.placement import PlacementError, parse_size, plan_placement
    from kimi_desk.bench.random_checkpoint import random_model
    from kimi_desk.bench.model import warm_state

    budget = parse_size(budget_text, "--gpu-memory")
    row: dict = {"gpu_budget": budget_text, "gpu_budget_bytes": budget, "quantize": quantize}
    for tokens in read_tokens:
        try:
            fits = plan_placement(config, "bfloat16", quantize, gpu_budget=budget, context_tokens=tokens,
                                  prefill_chunk=chunk).describe()
        except PlacementError as refused:
            fits = f"does not fit: {refused}"
        row[f"read_{tokens}_plan"] = fits
    context = max([*contexts, prefill_tokens])
    try:
        plan = plan_placement(config, "bfloat16", quantize, gpu_budget=budget, context_tokens=context,
                              prefill_chunk=chunk)
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
    model = fuse_projections(random_model(config, seed=0, dtype=torch.bfloat16, device="cuda", quantize=quantize,
                                          placement=plan))
    row["build_s"] = time.perf_counter() - start
    stats = model.offload.stats if model.offload is not None else None
    log(f"budget {budget_text}: model built in {row['build_s']:.0f} s, "
        f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB on the GPU")
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
    row.update(prefill_tokens=prefill_tokens, prefill_s=marks[-1][1], prefill_tok_s=prefill_tokens / marks[-1][1],
               prefill_marks=marks, chunk=chunk,
               pcie_bytes_per_chunk=(stats.streamed_bytes / chunks) if stats else 0,
               prefill_stats=stats.to_dict() if stats else None)
    del state
    row["decode"] = []
    for ctx in contexts:
        state, token = warm_state(model, ctx, ids[:, :1], gen)
        if stats:
            stats.reset()
        steps = 20
        start = time.perf_counter()
        for _ in range(steps):
            token = model(token, state)[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - start) / steps * 1e3
        d = {"context": ctx, "ms_per_token": ms, "tok_s": 1e3 / ms}
        if stats:
            cpu_ms, wait_ms = stats.cpu_seconds / steps * 1e3, stats.wait_seconds / steps * 1e3
            d.update(cpu_expert_ms=cpu_ms, host_wait_ms=wait_ms, other_ms=ms - cpu_ms - wait_ms,
                     pcie_bytes_per_token=(stats.d2h_bytes + stats.h2d_bytes) / steps)
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
