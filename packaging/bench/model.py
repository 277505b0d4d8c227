"""Whole-model check and benchmark on one CUDA GPU (`kimi-desk bench model`).

1. Correctness: a small random model (7 layers, K K K M K K M) loaded from one checkpoint on the CPU
   (PyTorch path, float32) and on the GPU (Triton kernels, float32 and bfloat16): logit errors against
   the CPU, and how many of 16 greedy tokens agree.
2. Speed at the exact shapes of Kimi-Linear-48B-A3B, on a slice of the model (by default 4 layers:
   dense KDA layer 0, two KDA + MoE layers, one MLA + MoE layer) with random bf16 weights: prefill
   tokens/s and batch-1 decode tokens/s with 8k and 128k tokens in the cache (the cache and KDA state
   filled with random values: decode costs do not depend on them), peak GPU memory.
3. The baseline in the same run: transformers' native Kimi Linear with fla's kernels, same slice.
Decode is compared with the roofline: bytes one token must read (active weights, the MLA cache, the
KDA state read and written) over the device-to-device copy bandwidth measured in the same run.

Decode is timed eagerly (one Python launch per kernel) and as a replayed CUDA graph (engine/cuda_graph.py),
the path generation takes on a GPU; the check compares the graph's greedy tokens with eager decode's on
the small model. The routed experts of one token are also timed alone: the Triton GEMV, the gathered
PyTorch form (graph-capturable, copies the chosen weights) and the grouped PyTorch form (host sync).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

from kimi_desk.engine.errors import UserError


def _sync():
    import torch

    torch.cuda.synchronize()


def _rel(a, b) -> float:
    return float(((a.double() - b.double()).norm() / b.double().norm()).item())


def copy_bandwidth() -> float:
    import torch

    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    _sync()
    start = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    _sync()
    return 2 * x.numel() * 20 / (time.perf_counter() - start)


def check_correctness(log) -> dict:
    import torch

    from kimi_desk.bench.random_checkpoint import tail7_config, write_random_checkpoint
    from kimi_desk.engine import load_model
    from kimi_desk.engine.fuse import fuse_projections

    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_checkpoint(tail7_config(), Path(tmp) / "m", seed=3)
        cpu = load_model(path, device="cpu", dtype=torch.float32)
        gpu32 = load_model(path, device="cuda", dtype=torch.float32)
        gpu16 = load_model(path, device="cuda", dtype=torch.bfloat16)
        gpu8 = load_model(path, device="cuda", dtype=torch.bfloat16, quantize="fp8")
        # As the app loads it (engine/fuse.py: joined projections, the shared expert stacked with the
        # routed ones), beside the same checkpoint loaded as is.
        fused = {
            name: fuse_projections(load_model(path, device="cuda", dtype=model.dtype, quantize=model.quantization))
            for name, model in [("fp32", gpu32), ("bf16", gpu16), ("fp8", gpu8)]
        }
        # int8 and int4: the GPU's kernels against the CPU's path of the same format (the same codes,
        # quantized from the same checkpoint; the CPU prepared as the app prepares it).
        from kimi_desk.engine.quantize import prepare_for_cpu

        same_format = {}
        for fmt in ("int8", "int4"):
            cpu_fmt = fuse_projections(load_model(path, device="cpu", dtype=torch.float32, quantize=fmt))
            prepare_for_cpu(cpu_fmt)
            same_format[fmt] = (
                fuse_projections(load_model(path, device="cuda", dtype=torch.bfloat16, quantize=fmt)),
                cpu_fmt,
            )
    ids = torch.randint(0, cpu.config.vocab_size, (1, 300), generator=torch.Generator().manual_seed(7))
    ref = cpu(ids, cpu.new_state(1))
    logits16 = gpu16(ids.cuda(), gpu16.new_state(1)).float().cpu()
    logits8 = gpu8(ids.cuda(), gpu8.new_state(1)).float().cpu()
    result = {
        "logits_rel_err_fp32": _rel(gpu32(ids.cuda(), gpu32.new_state(1)).cpu(), ref),
        "logits_rel_err_bf16": _rel(logits16, ref),
        "logits_rel_err_fp8": _rel(logits8, ref),
        "logits_rel_err_fp8_vs_bf16": _rel(logits8, logits16),
    }
    # The fused models against the separate ones on the GPU: a prefill, then 8 decode steps.
    for name, separate in [("fp32", gpu32), ("bf16", gpu16), ("fp8", gpu8)]:
        outs = []
        for model in (separate, fused[name]):
            state = model.new_state(1)
            outs.append(
                torch.cat(
                    [model(ids[:, :292].cuda(), state)]
                    + [model(ids[:, t : t + 1].cuda(), state) for t in range(292, 300)],
                    1,
                ).float()
            )
        result[f"fused_vs_separate_rel_err_{name}"] = _rel(outs[1].cpu(), outs[0].cpu())
    del fused
    # Prefill chunks that take MLA's expanded form after cached tokens (the cached keys' blocks merged).
    for name, model in [("fp32", gpu32), ("bf16", gpu16)]:
        state = model.new_state(1)
        parts = [model(ids[:, a : a + 100].cuda(), state) for a in (0, 100, 200)]
        result[f"prefill_chunks_rel_err_{name}"] = _rel(torch.cat(parts, 1).float().cpu(), ref)

    # A session's pattern: a document, then short turns (under one KDA chunk) on the kept state.
    bounds = [0, 200, 218, 263, 300]
    for name, model in [("fp32", gpu32), ("bf16", gpu16)]:
        state = model.new_state(1)
        parts = [model(ids[:, a:b].cuda(), state) for a, b in zip(bounds, bounds[1:])]
        result[f"uneven_chunks_rel_err_{name}"] = _rel(torch.cat(parts, 1).float().cpu(), ref)

    def greedy(model, n=16):
        state = model.new_state(1)
        token = model(ids.to(model.device), state, last_only=True)[:, -1].argmax(-1, keepdim=True)
        out = [token.item()]
        for _ in range(n - 1):
            token = model(token, state)[:, -1].argmax(-1, keepdim=True)
            out.append(token.item())
        return out

    want = greedy(cpu)
    for fmt, (gpu_fmt, cpu_fmt) in same_format.items():
        on_cpu = cpu_fmt(ids, cpu_fmt.new_state(1))
        on_gpu = gpu_fmt(ids.cuda(), gpu_fmt.new_state(1)).float().cpu()
        result[f"logits_rel_err_{fmt}_gpu_vs_cpu"] = _rel(on_gpu, on_cpu)
        result[f"logits_rel_err_{fmt}_vs_fp32"] = _rel(on_gpu, ref)
        result[f"greedy_agree_{fmt}_gpu_vs_cpu"] = sum(a == b for a, b in zip(greedy(gpu_fmt), greedy(cpu_fmt)))
        try:
            result[f"graph_vs_eager_{fmt}"] = check_graph_decode(gpu_fmt, ids)
        except Exception as exc:
            result[f"graph_vs_eager_{fmt}"] = {"error": f"{type(exc).__name__}: {exc}"}
            log(traceback.format_exc())
    del same_format
    for name, model in [("fp32", gpu32), ("bf16", gpu16), ("fp8", gpu8)]:
        got = greedy(model)
        result[f"greedy_agree_{name}"] = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
        try:
            result[f"graph_vs_eager_{name}"] = check_graph_decode(model, ids)
        except Exception as exc:  # reported, so that the timings still run
            result[f"graph_vs_eager_{name}"] = {"error": f"{type(exc).__name__}: {exc}"}
            log(traceback.format_exc())
    log(f"check: {json.dumps(result)}")
    return result


def check_graph_decode(model, ids, prompt: int = 250, steps: int = 32) -> dict:
    """Greedy decode from the same prefilled state, eagerly and through the replayed CUDA graph. Halfway
    the MLA caches are moved (as a cache that grows, or a restored snapshot, moves them), so the step is
    recorded a second time. Also generate() itself, with and without the graph."""
    import os

    from kimi_desk.engine.cuda_graph import GraphDecoder
    from kimi_desk.engine.generate import Sampling, generate
    from kimi_desk.engine.state import MLACache

    state = model.new_state(1)
    first = model(ids[:, :prompt].to(model.device), state, last_only=True)[:, -1].argmax(-1, keepdim=True)
    graph_state = state.clone()
    eager, eager_logits, token = [], [], first
    for _ in range(steps):
        logits = model(token, state, last_only=True)[0, -1]
        token = logits.argmax().view(1, 1)
        eager.append(token.item())
        eager_logits.append(logits.clone())
    decoder = GraphDecoder(model, graph_state)
    graph, worst, token = [], 0.0, first
    for i in range(steps):
        if i == steps // 2:
            for cache in graph_state.layers:
                if isinstance(cache, MLACache):
                    cache.reserve(cache.capacity + 1)
        logits = decoder.step(token)
        token = decoder.greedy_token
        graph.append(token.item())
        worst = max(worst, _rel(logits, eager_logits[i]))
    agree = next((i for i, (a, b) in enumerate(zip(graph, eager)) if a != b), steps)
    result = {
        "tokens_agreeing": agree,
        "of": steps,
        "max_logits_rel_err": worst,
        "recordings": decoder.recordings,
        "bitwise_equal_logits": worst == 0.0,
    }
    runs, sampled_runs = {}, {}
    sampled = Sampling(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.2, seed=3)
    for graphs in ("1", "0"):
        os.environ["KIMI_DESK_CUDA_GRAPH"] = graphs
        runs[graphs] = generate(
            model, ids[0, :prompt].tolist(), model.new_state(1), max_new_tokens=steps, stop_token_ids=[]
        ).token_ids
        sampled_runs[graphs] = generate(
            model,
            ids[0, :prompt].tolist(),
            model.new_state(1),
            max_new_tokens=steps,
            stop_token_ids=[],
            sampling=sampled,
        ).token_ids
    # A reply that stops halfway: looking ahead, the graph takes its extra step back (undo); the tokens,
    # the position and the KDA states as the eager loop leaves them.
    stop, stopped = runs["0"][steps // 2], {}
    for graphs in ("1", "0"):
        os.environ["KIMI_DESK_CUDA_GRAPH"] = graphs
        stopped_state = model.new_state(1)
        reply = generate(
            model,
            ids[0, :prompt].tolist(),
            stopped_state,
            max_new_tokens=steps,
            stop_token_ids=[stop],
        ).token_ids
        stopped[graphs] = (reply, stopped_state)
    os.environ.pop("KIMI_DESK_CUDA_GRAPH")
    (graph_reply, graph_state), (eager_reply, eager_state) = stopped["1"], stopped["0"]
    kda = [(a, b) for a, b in zip(graph_state.layers, eager_state.layers) if hasattr(a, "recurrent")]
    result["stopped_reply_graph_equals_eager"] = (
        graph_reply == eager_reply and graph_state.position == eager_state.position
    )
    result["stopped_kda_state_rel_err"] = max(_rel(a.recurrent, b.recurrent) for a, b in kda)
    result["generate_graph_equals_eager"] = runs["1"] == runs["0"]
    # Sampled inside the replayed step against sampled on the host after eager steps: the same draws.
    result["sampled_generate_graph_equals_eager"] = sampled_runs["1"] == sampled_runs["0"]
    result["generate_equals_eager_decode"] = runs["0"] == [first.item()] + eager[: steps - 1]
    return result


def slice_config(layers: int):
    from kimi_desk.bench.random_checkpoint import kimi_linear_48b_config

    config = kimi_linear_48b_config()
    kinds = config.layer_kinds[:layers]
    if "mla" not in kinds:
        kinds[-1] = "mla"
    config.num_hidden_layers = layers
    config.kda_layers = [i + 1 for i, k in enumerate(kinds) if k == "kda"]
    config.full_attn_layers = [i + 1 for i, k in enumerate(kinds) if k == "mla"]
    config.validate()
    return config


def decode_bytes(model, context: int) -> int:
    """Bytes one batch-1 decode step must read: every weight except the routed experts not chosen (8 of
    256 per layer; a shared expert stacked with them, engine/fuse.py, is read too), one embedding row,
    the MLA caches, and the KDA state read and written."""
    config = model.config
    total = 0
    for name, p in [*model.named_parameters(), *model.named_buffers()]:
        if name.endswith("embed_tokens.weight"):
            total += p.shape[1] * p.element_size()
        elif ".experts." in name:  # the stacked experts and their scales
            read = config.num_experts_per_token + p.shape[0] - config.num_experts
            total += p.nbytes // p.shape[0] * read
        else:
            total += p.nbytes
    mla_layers = config.layer_kinds.count("mla")
    kda_layers = config.layer_kinds.count("kda")
    total += mla_layers * context * config.mla_latent_size * 2
    total += kda_layers * 2 * config.kda_num_heads * config.kda_head_dim**2 * 4
    return total


def time_ours(
    config, prefill_tokens: int, contexts: list[int], chunk: int, log, profile: bool = True, quantize: str | None = None
) -> dict:
    import torch

    from kimi_desk.bench.random_checkpoint import random_model
    from kimi_desk.engine.fuse import fuse_projections

    torch.cuda.reset_peak_memory_stats()
    # As the app runs it (Assistant.load): the projections that share an input joined.
    model = fuse_projections(random_model(config, seed=0, dtype=torch.bfloat16, device="cuda", quantize=quantize))
    log(f"ours: model built, {torch.cuda.memory_allocated() / 2**30:.1f} GiB")
    gen = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (1, prefill_tokens), device="cuda", generator=gen)
    # Compile (and autotune) every kernel the timed read runs: a first chunk, then one after a cache.
    warm = model.new_state(1)
    for a in range(0, min(2 * chunk, prefill_tokens), chunk):
        model(ids[:, a : a + chunk], warm, last_only=True)
    del warm
    state = model.new_state(1)
    _sync()
    start = time.perf_counter()
    marks = []  # (tokens read, seconds since the start) at every power of two from 8k, and the end
    for a in range(0, prefill_tokens, chunk):
        model(ids[:, a : a + chunk], state, last_only=True)
        read = min(prefill_tokens, a + chunk)
        if read == prefill_tokens or (read >= 8192 and read & (read - 1) == 0):
            _sync()
            marks.append((read, time.perf_counter() - start))
            log(
                f"ours: read {read:,} tokens in {marks[-1][1]:.1f} s ({read / marks[-1][1]:,.0f} tok/s), peak "
                f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
            )
    out = {
        "prefill_tokens": prefill_tokens,
        "prefill_tok_s": prefill_tokens / marks[-1][1],
        "prefill_s": marks[-1][1],
        "prefill_marks": marks,
        "prefill_peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "decode": [],
    }
    if profile:
        # One more chunk after the document: where a prefill chunk's time goes.
        out["prefill_chunk_kernels"] = profile_kernels(
            lambda: model(ids[:, :chunk], state, last_only=True), log, f"prefill chunk at {prefill_tokens:,}"
        )
    del state
    for context in contexts:
        state, token = warm_state(model, context, ids[:, :1], gen)
        steps = 20
        start = time.perf_counter()
        for _ in range(steps):
            token = model(token, state)[:, -1].argmax(-1, keepdim=True)
        _sync()
        ms = (time.perf_counter() - start) / steps * 1e3
        row = {"context": context, "ms_per_token": ms, "bytes": decode_bytes(model, context)}
        log(f"ours: decode at {context:,}: {ms:.2f} ms/token eager")
        try:
            row.update(time_graph_decode(model, state, token))
            log(
                f"ours: decode at {context:,}: {row['graph_ms_per_token']:.3f} ms/token in a CUDA graph, "
                f"{row['graph_synced_ms_per_token']:.3f} with the token read back every step"
            )
            if profile and context == contexts[-1]:
                row["eager_step_kernels"] = profile_step(model, state, token, log)
        except Exception as exc:
            row["graph_error"] = f"{type(exc).__name__}: {exc}"
            log(traceback.format_exc())
        out["decode"].append(row)
        del state
    out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if profile:  # the first format only: generate() prefills the whole context again
        try:
            out["generate"] = time_generate(model, contexts[-1], log)
        except Exception as exc:
            out["generate"] = {"error": f"{type(exc).__name__}: {exc}"}
            log(traceback.format_exc())
    try:
        out["moe"] = time_routed_experts(model, log)
    except Exception as exc:
        out["moe"] = {"error": f"{type(exc).__name__}: {exc}"}
        log(traceback.format_exc())
    del model
    torch.cuda.empty_cache()
    return out


def random_state(model, context: int, gen):
    """A state of `context` cached tokens on the GPU: random MLA cache and KDA state (decode costs do not
    depend on the values)."""
    import torch

    from kimi_desk.engine.state import KDAState

    state = model.new_state(1)
    for layer in state.layers:
        if isinstance(layer, KDAState):
            layer.recurrent.normal_(0, 0.1, generator=gen)
        else:
            layer.append(
                torch.randn(1, context, layer.latents.shape[-1], device="cuda", generator=gen, dtype=torch.bfloat16)
            )
    state.position = context
    return state


def warm_state(model, context: int, token, gen):
    """A random_state of `context` cached tokens and the token after three warm-up steps on it."""
    state = random_state(model, context, gen)
    for _ in range(3):
        token = model(token, state)[:, -1].argmax(-1, keepdim=True)
    _sync()
    return state, token


def chained_replays(decoder, token, steps: int):
    """`steps` replays of a GraphDecoder's recorded step, each fed the one before's greedy token on the GPU
    (no host synchronisation); returns the last token."""
    for _ in range(steps):
        decoder.step(token)
        token = decoder.greedy_token
    return token


def chained_ms_per_token(decoder, token, steps: int):
    """ms per token of `steps` chained_replays, timed from an idle GPU until it is done; and the last token."""
    _sync()
    start = time.perf_counter()
    token = chained_replays(decoder, token, steps)
    _sync()
    return (time.perf_counter() - start) / steps * 1e3, token


def time_graph_decode(model, state, token, steps: int = 50) -> dict:
    """ms per token replaying the recorded step: chained on the GPU (each step's greedy token feeds the
    next, no host synchronisation), and reading the token back every step as generation does."""
    from kimi_desk.engine.cuda_graph import GraphDecoder

    decoder = GraphDecoder(model, state)
    token = chained_replays(decoder, token, 3)
    chained, token = chained_ms_per_token(decoder, token, steps)
    start = time.perf_counter()
    for _ in range(steps):
        decoder.step(token)
        token = decoder.greedy_token.item()
    synced = (time.perf_counter() - start) / steps * 1e3
    return {"graph_ms_per_token": chained, "graph_synced_ms_per_token": synced, "graph_recordings": decoder.recordings}


def time_generate(model, context: int, log, new_tokens: int = 40) -> dict:
    """The product's path end to end: generate() on a random prompt of `context` tokens (prefilled in
    its default chunks), greedy and then sampled (temperature, top-k, top-p and repetition penalty, all
    chosen inside the replayed step); the median time of its decode steps (each replays the step with
    the host's draw and reads the chosen token back), to set beside the replayed step's own time."""
    import torch

    from kimi_desk.engine.generate import Sampling, generate

    gen = torch.Generator(device="cuda").manual_seed(5)
    prompt = torch.randint(0, model.config.vocab_size, (context,), device="cuda", generator=gen)
    out = {"context": context}
    sampled = Sampling(temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.1, seed=1)
    for prefix, sampling in (("", None), ("sampled_", sampled)):
        options = {} if sampling is None else {"sampling": sampling}
        result = generate(model, prompt, model.new_state(1), max_new_tokens=new_tokens, stop_token_ids=[], **options)
        steps = sorted(step.seconds for step in result.steps[1:])
        out.update(
            {
                f"{prefix}first_token_s": result.steps[0].seconds,
                f"{prefix}tokens": len(result.steps),
                f"{prefix}median_ms_per_token": steps[len(steps) // 2] * 1e3,
            }
        )
        log(
            f"ours: generate() {prefix or 'greedy_'}after a {context:,}-token prompt: first token "
            f"{out[prefix + 'first_token_s']:.2f} s, then {out[prefix + 'median_ms_per_token']:.3f} ms/token (median)"
        )
    return out


def profile_step(model, state, token, log, top: int = 25) -> list[dict]:
    """GPU time per kernel of one eager decode step (the graph replays the same kernels): where the
    step's time goes, and the sum to set beside the replayed step's time (the rest is gaps). Without
    programmatic dependent launch, whose early starts would count each kernel's wait in its time."""
    from kimi_desk.kernels import without_pdl

    with without_pdl():
        for _ in range(2):
            model(token, state)
        _sync()
        return profile_kernels(lambda: model(token, state), log, "eager step, without PDL", top)


def profile_kernels(run, log, label: str, top: int = 25) -> list[dict]:
    """GPU time per kernel of one call of `run`, largest first, beside the call's wall time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        run()
        _sync()
        wall_us = (time.perf_counter() - start) * 1e6
    kernels = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = kernels.setdefault(event.name, {"name": event.name, "count": 0, "us": 0.0})
            entry["count"] += 1
            entry["us"] += event.time_range.elapsed_us()
    rows = sorted(kernels.values(), key=lambda e: -e["us"])
    total = sum(e["us"] for e in rows)
    log(
        f"{label}: {sum(e['count'] for e in rows)} kernels, {total:.0f} us of GPU time in all, "
        f"{wall_us:.0f} us of wall time (profiled)"
    )
    for e in rows[:top]:
        log(f"  {e['us']:8.1f} us  x{e['count']:<5d} {e['name'][:110]}")
    return [{"total_us": total, "wall_us": wall_us, "kernels": sum(e["count"] for e in rows)}] + rows[:top]


def time_routed_experts(model, log) -> dict:
    """One token's routed experts at the model's shapes, three ways (GPU time, replayed in a graph where
    the form allows it), with the bytes the chosen experts' weights take."""
    import torch
    import triton.testing

    from kimi_desk.kernels.moe import routed_experts_gathered, routed_experts_grouped
    from kimi_desk.kernels.moe.gemv import routed_experts_gemv

    experts = next(m for m in model.modules() if type(m).__name__ == "Experts")
    config = model.config
    gen = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randn(1, config.hidden_size, device="cuda", generator=gen, dtype=model.dtype)
    ids = torch.randperm(config.num_experts, device="cuda", generator=gen)[: config.num_experts_per_token][None]
    weights = torch.rand(ids.shape, device="cuda", generator=gen)
    if hasattr(experts, "w1_zero"):
        scales = tuple((getattr(experts, f"w{i}_scale"), getattr(experts, f"w{i}_zero")) for i in (1, 2, 3))
    else:
        scales = (experts.w1_scale, experts.w2_scale, experts.w3_scale) if hasattr(experts, "w1_scale") else None
    args = (x, ids, weights, experts.w1, experts.w2, experts.w3, scales)
    ref = routed_experts_grouped(*args)
    result = {
        "bytes": 3 * config.num_experts_per_token * experts.w1[0].nbytes,
        "gemv_rel_err": _rel(routed_experts_gemv(*args), ref),
        "gathered_rel_err": _rel(routed_experts_gathered(*args), ref),
    }
    with torch.inference_mode():
        for name, fn in [("gemv", routed_experts_gemv), ("gathered", routed_experts_gathered)]:
            result[f"{name}_us"] = 1e3 * triton.testing.do_bench_cudagraph(lambda fn=fn: fn(*args), rep=50)
        result["grouped_us"] = 1e3 * triton.testing.do_bench(
            lambda: routed_experts_grouped(*args), rep=50, return_mode="median"
        )
    log(f"moe, one token: {json.dumps(result)}")
    return result


def time_transformers(config, prefill_tokens: int, contexts: list[int], chunk: int, log) -> dict:
    """Prefill rate over `prefill_tokens`, decode at each context. Contexts beyond the prefill take its
    cache grown with random rows (decode costs do not depend on their values, as for ours) where the
    cache's layout allows it (`_grow_cache`), which saves minutes of the baseline's slow prefill; else
    the prefill goes on to them."""
    import torch
    import transformers

    hf_config = transformers.KimiLinearConfig(**config.to_dict())
    hf_config._attn_implementation = "sdpa"
    torch.cuda.reset_peak_memory_stats()
    with torch.device("cuda"):
        model = transformers.KimiLinearForCausalLM._from_config(hf_config, dtype=torch.bfloat16).eval()
    gen = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (1, max([prefill_tokens, *contexts])), device="cuda", generator=gen)
    out = {"decode": []}

    # Seconds spent timing decode in the middle of the prefill, kept out of the prefill rate.
    paused = [0.0]

    def decode_ms(cache, context, how):
        began = time.perf_counter()
        token = ids[:, :1]
        for _ in range(2):
            o = model(token, past_key_values=cache, use_cache=True)
        _sync()
        steps = 5
        start_decode = time.perf_counter()
        for _ in range(steps):
            o = model(token, past_key_values=cache, use_cache=True)
            token = o.logits[:, -1].argmax(-1, keepdim=True)
        _sync()
        ms = (time.perf_counter() - start_decode) / steps * 1e3
        out["decode"].append({"context": context, "ms_per_token": ms, "cache": how})
        log(f"transformers: decode at {context:,} ({how}): {ms:.2f} ms/token")
        paused[0] += time.perf_counter() - began

    with torch.no_grad():
        model(ids[:, :1024], use_cache=True, logits_to_keep=1)
        cache = None
        reached = 0

        def prefill_to(target):
            nonlocal cache, reached
            while reached < target:
                o = model(ids[:, reached : reached + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
                cache = o.past_key_values
                reached += ids[:, reached : reached + chunk].shape[1]
                if reached in contexts:
                    decode_ms(_clone_cache(cache), reached, "prefilled")

        _sync()
        start = time.perf_counter()
        prefill_to(prefill_tokens)
        _sync()
        out["prefill_tokens"] = reached
        out["prefill_tok_s"] = reached / (time.perf_counter() - start - paused[0])
        log(f"transformers: prefill {out['prefill_tok_s']:,.0f} tok/s over {reached:,} tokens")
        for context in sorted(c for c in contexts if c > reached):
            trial = _clone_cache(cache)
            try:
                grown = _grow_cache(trial, reached, context)
                if grown:
                    decode_ms(trial, context, f"prefilled {reached:,}, then random rows")
            except Exception:
                log(traceback.format_exc())
                grown = False
            del trial
            if not grown:
                prefill_to(context)
    out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del model, cache
    torch.cuda.empty_cache()
    return out


def _grow_cache(cache, length: int, target: int) -> bool:
    """Grow a transformers cache's attention layers from `length` to `target` tokens with random rows of
    the same scale. Layers whose keys are not [..., length, d] (the KDA states) are left alone. False
    (and the cache not to be used) unless afterwards the cache reports `target` tokens."""
    import torch

    grown = 0
    for layer in getattr(cache, "layers", []):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not (isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor)):
            continue
        if keys.dim() != 4 or keys.shape[-2] != length or values.shape[-2] != length:
            continue
        for name, t in (("keys", keys), ("values", values)):
            extra = torch.randn(*t.shape[:-2], target - length, t.shape[-1], device=t.device) * t.float().std()
            setattr(layer, name, torch.cat([t, extra.to(t.dtype)], dim=-2))
        grown += 1
    return grown > 0 and cache.get_seq_length() == target


def _clone_cache(cache):
    import copy

    return copy.deepcopy(cache)


def demo_model_gates(device: str = "cuda", tokens: int = 4096) -> list:
    """The KDA layers' log decays, [tokens, H, K] fp32 each, of the embedded demo model (assets/model)
    reading the repository's README.md (the model card where the README is not beside the assets),
    repeated up to `tokens`: the gates of a trained model, for `kimi-desk bench kernels`' gate sweep."""
    import torch

    import kimi_desk.assets
    from kimi_desk.engine.kda import record_gates
    from kimi_desk.engine.tokenizer import load_tokenizer
    from kimi_desk.engine.weights import load_model

    folder = Path(kimi_desk.assets.__file__).resolve().parent / "model"
    readme = folder.parent.parent / "README.md"
    ids = load_tokenizer(folder).encode((readme if readme.is_file() else folder / "README.md").read_text())
    ids = (ids * (tokens // len(ids) + 1))[:tokens]
    model = load_model(folder, device=device)
    gates = [g[0] for g in record_gates(model, torch.tensor([ids]))]
    del model
    return gates


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=4, help="layers of the 48B model to build (default 4)")
    parser.add_argument("--prefill-tokens", type=int, default=32768)
    parser.add_argument("--contexts", default="8192,131072", help="cached tokens for decode, comma-separated")
    parser.add_argument("--chunk", type=int, default=8192, help="prefill chunk (default 8192)")
    parser.add_argument("--no-baseline", action="store_true", help="skip transformers + fla")
    parser.add_argument(
        "--baseline-layers",
        type=int,
        default=None,
        help="layers of the baseline's slice when fewer than --layers fit in bf16 (its times are "
        "scaled per layer to --layers; default: --layers)",
    )
    parser.add_argument(
        "--quantize",
        default="none",
        help="our model's weight formats, comma-separated, each timed in "
        "turn: none, fp8, int8, int4 (the baseline stays bf16); default none",
    )
    parser.add_argument(
        "--gpu-memory",
        default=None,
        metavar="SIZE[,SIZE]",
        help="GPU memory budgets, comma-separated (e.g. 24GiB,16GiB): the model placed in each, the "
        "routed experts that do not fit in RAM, the cap enforced as a hard limit "
        "(packaging/bench/offload.py); replaces the whole-GPU timing and the baseline",
    )
    parser.add_argument(
        "--read-tokens",
        default="131072,1048576",
        help="with --gpu-memory: document lengths whose plan is reported (fits or not)",
    )
    parser.add_argument("--json", type=Path, default=None)


def main(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        raise UserError("kimi-desk bench model needs a CUDA GPU")
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    config = slice_config(args.layers)
    import triton

    result = {
        "benchmark": "model",
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "layers": args.layers,
        "layer_kinds": config.layer_kinds,
        "copy_bytes_per_s": copy_bandwidth(),
    }

    def save():
        # After every part, so that a run cut short keeps what it measured.
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")

    formats = [f.strip() for f in args.quantize.split(",") if f.strip()]
    unknown = sorted(set(formats) - {"none", "fp8", "int8", "int4"})
    if unknown or not formats:
        raise UserError(f"--quantize takes none, fp8, int8 and int4, comma-separated; got {args.quantize!r}")
    if args.gpu_memory:
        return run_budgets(args, config, formats, contexts, result, save, log)
    result["check"] = check_correctness(log)
    save()
    result["formats"] = {}
    for fmt in formats:
        quantize = None if fmt == "none" else fmt
        result["formats"][fmt] = time_ours(
            config, args.prefill_tokens, contexts, args.chunk, log, quantize=quantize, profile=fmt == formats[0]
        )
        save()
    result["quantize"], result["ours"] = (None if formats[0] == "none" else formats[0]), result["formats"][formats[0]]
    print(markdown_table(result), flush=True)
    if len(formats) > 1:
        print(formats_table(result), flush=True)
    if not args.no_baseline:
        result["baseline_layers"] = args.baseline_layers or args.layers
        result["baseline_layer_kinds"] = slice_config(result["baseline_layers"]).layer_kinds
        result["transformers"] = time_transformers(
            slice_config(result["baseline_layers"]), args.prefill_tokens, contexts, args.chunk, log
        )
        save()
        print(markdown_table(result))
    return 0


def run_budgets(args, config, formats, contexts, result, save, log) -> int:
    from kimi_desk.bench.offload import check_offload, time_budget
    from kimi_desk.engine.placement import parse_size

    budgets = [b.strip() for b in args.gpu_memory.split(",") if b.strip()]
    for budget in budgets:
        parse_size(budget, "--gpu-memory")
    try:
        reads = [int(t) for t in args.read_tokens.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--read-tokens must be comma-separated integers, got {args.read_tokens!r}") from None
    try:
        result["offload_check"] = check_offload(log)
    except Exception as exc:
        result["offload_check"] = {"error": f"{type(exc).__name__}: {exc}"}
        log(traceback.format_exc())
    save()
    result["budgets"] = []
    for fmt in formats:
        for budget in budgets:
            try:
                row = time_budget(
                    config,
                    budget,
                    None if fmt == "none" else fmt,
                    args.prefill_tokens,
                    contexts,
                    args.chunk,
                    reads,
                    log,
                )
            except Exception as exc:
                row = {"gpu_budget": budget, "quantize": fmt, "error": f"{type(exc).__name__}: {exc}"}
                log(traceback.format_exc())
                import torch

                torch.cuda.empty_cache()
                torch.cuda.set_per_process_memory_fraction(1.0)
            result["budgets"].append(row)
            save()
    return 0


def formats_table(r: dict) -> str:
    """One row per weight format: prefill and graph decode against each format's own roofline."""
    bw = r["copy_bytes_per_s"]
    scale = 27 / r["layers"]
    lines = [
        f"Weight formats, {r['layers']} layers at the 48B shapes ({r['device']}, {r['date']}, copy bandwidth "
        f"{bw / 1e12:.2f} TB/s):",
        "",
        "| format | prefill tok/s | peak GiB | "
        + " | ".join(
            f"decode at {d['context']:,}: ms/token (roofline share), tok/s at 27 layers"
            for d in next(iter(r["formats"].values()))["decode"]
        )
        + " |",
        "|---|---:|---:|" + "---:|" * len(next(iter(r["formats"].values()))["decode"]),
    ]
    for fmt, ours in r["formats"].items():
        cells = []
        for d in ours["decode"]:
            ms = min(d.get("graph_ms_per_token", d["ms_per_token"]), d["ms_per_token"])
            floor_ms = d["bytes"] / bw * 1e3
            cells.append(f"{ms:.3f} ({floor_ms / ms:.0%} of {floor_ms:.3f}), {1e3 / (ms * scale):.0f}")
        lines.append(f"| {fmt} | {ours['prefill_tok_s']:,.0f} | {ours['peak_gib']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_table(r: dict) -> str:
    bw = r["copy_bytes_per_s"]
    scale = 27 / r["layers"]
    lines = [
        f"{r['device']}, torch {r['torch']}, triton {r.get('triton', '?')}, {r['date']}; slice of "
        f"{r['layers']} layers ({' '.join(k.upper() for k in r['layer_kinds'])}) at the 48B shapes, random "
        f"{r['quantize'] + ' (ours; the baseline bf16)' if r.get('quantize') else 'bf16'} weights; copy bandwidth "
        f"{bw / 1e12:.2f} TB/s.",
        "",
        "| measure | kimi-desk | transformers + fla | ratio |",
        "|---|---|---|---|",
    ]
    ours, base = r["ours"], r.get("transformers", {})
    # The baseline's slice may be shorter (what fits in bf16): its times scaled per layer to ours.
    per_layer = r["layers"] / r.get("baseline_layers", r["layers"])
    if base and per_layer != 1:
        lines.insert(
            1,
            f"Baseline: a slice of {r['baseline_layers']} layers "
            f"({' '.join(k.upper() for k in r['baseline_layer_kinds'])}) in bf16, its times scaled "
            f"x{per_layer:.2f} to {r['layers']} layers.",
        )
    if base:
        theirs_rate = base["prefill_tok_s"] / per_layer
        lines.append(
            f"| prefill tok/s ({r['layers']} layers) | {ours['prefill_tok_s']:,.0f} ({ours['prefill_tokens']:,}"
            f" tokens) | {theirs_rate:,.0f} ({base['prefill_tokens']:,} tokens) | "
            f"{ours['prefill_tok_s'] / theirs_rate:.1f}x |"
        )
    else:
        lines.append(
            f"| prefill tok/s ({r['layers']} layers, {ours['prefill_tokens']:,} tokens) | "
            f"{ours['prefill_tok_s']:,.0f} | n/a | |"
        )
    for read, seconds in ours.get("prefill_marks", []):
        if read in (131072, ours["prefill_tokens"]):
            lines.append(
                f"| time to read the first {read:,} tokens | {seconds:.1f} s ({read / seconds:,.0f} tok/s) | | |"
            )
    lines.append(f"| peak GPU memory during the read, GiB | {ours['prefill_peak_gib']:.1f} | | |")
    for d in ours["decode"]:
        other = next((x for x in base.get("decode", []) if x["context"] == d["context"]), None)
        theirs = other["ms_per_token"] * per_layer if other else None
        floor_ms = d["bytes"] / bw * 1e3
        ways = [("eager", d["ms_per_token"])]
        if "graph_ms_per_token" in d:
            ways += [
                ("CUDA graph", d["graph_ms_per_token"]),
                ("CUDA graph, token read back each step", d["graph_synced_ms_per_token"]),
            ]
        for how, ms in ways:
            lines.append(
                f"| decode ms/token at {d['context']:,}, {how} | {ms:.3f} ({floor_ms / ms:.0%} of roofline "
                f"{floor_ms:.3f}) | {f'{theirs:.2f}' if theirs else 'n/a'} | "
                f"{f'{theirs / ms:.1f}x' if theirs else ''} |"
            )
        best = min(ms for _, ms in ways)
        lines.append(
            f"| decode tok/s at {d['context']:,}, best, scaled to 27 layers (x{scale:.2f}) | "
            f"{1e3 / (best * scale):.1f} | {f'{1e3 / (theirs * scale):.1f}' if theirs else 'n/a'} | |"
        )
    lines.append(f"| peak GPU memory GiB | {ours['peak_gib']:.1f} | {base.get('peak_gib', float('nan')):.1f} | |")
    c = r["check"]
    lines += [
        "",
        f"Correctness (7-layer random model, GPU against CPU float32): logits rel. error "
        f"{c['logits_rel_err_fp32']:.1e} (fp32), {c['logits_rel_err_bf16']:.1e} (bf16); in chunks of 100 "
        f"{c.get('prefill_chunks_rel_err_fp32', float('nan')):.1e} (fp32), "
        f"{c.get('prefill_chunks_rel_err_bf16', float('nan')):.1e} (bf16); the app's fused model against the "
        f"checkpoint as loaded {c.get('fused_vs_separate_rel_err_fp32', float('nan')):.1e} (fp32), "
        f"{c.get('fused_vs_separate_rel_err_bf16', float('nan')):.1e} (bf16), "
        f"{c.get('fused_vs_separate_rel_err_fp8', float('nan')):.1e} (fp8); greedy tokens agreeing out of 16: "
        f"{c['greedy_agree_fp32']} (fp32), {c['greedy_agree_bf16']} (bf16), {c.get('greedy_agree_fp8')} (fp8 "
        f"weights: logits rel. error {c.get('logits_rel_err_fp8', float('nan')):.1e} against CPU float32, "
        f"{c.get('logits_rel_err_fp8_vs_bf16', float('nan')):.1e} against bf16).",
    ]
    for name in ("fp32", "bf16", "fp8"):
        g = c.get(f"graph_vs_eager_{name}", {})
        lines.append(
            f"CUDA graph against eager decode, {name}: "
            + (
                g["error"]
                if "error" in g
                else f"{g['tokens_agreeing']} of {g['of']} greedy tokens agree, logits max rel. error "
                f"{g['max_logits_rel_err']:.1e}, {g['recordings']} recordings; generate() with the graph "
                f"gives eager's tokens: {g.get('generate_graph_equals_eager')} (sampled inside the step: "
                f"{g.get('sampled_generate_graph_equals_eager')}; a reply stopped halfway, its extra step taken "
                f"back: {g.get('stopped_reply_graph_equals_eager')}, KDA states "
                f"{g.get('stopped_kda_state_rel_err', float('nan')):.1e})."
            )
        )
    if "generate" in ours and "error" not in ours["generate"]:
        g = ours["generate"]
        lines.append(
            f"generate() after a {g['context']:,}-token prompt: first token {g['first_token_s']:.2f} s, "
            f"then {g['median_ms_per_token']:.3f} ms/token greedy (median of {g['tokens'] - 1}), "
            f"{g.get('sampled_median_ms_per_token', float('nan')):.3f} ms/token sampled."
        )
    if "moe" in ours and "error" not in ours["moe"]:
        m = ours["moe"]
        lines.append(
            f"Routed experts of one token ({m['bytes'] / 1e6:.0f} MB of weights, floor "
            f"{m['bytes'] / bw * 1e6:.1f} us): Triton GEMV {m['gemv_us']:.1f} us, gathered + bmm "
            f"{m['gathered_us']:.1f} us (graph), grouped with host sync {m['grouped_us']:.1f} us."
        )
    return "\n".join(lines)
