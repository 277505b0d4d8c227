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
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path


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

    from kimi_desk.engine import load_model
    from kimi_desk.engine.random_checkpoint import tail7_config, write_random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_checkpoint(tail7_config(), Path(tmp) / "m", seed=3)
        cpu = load_model(path, device="cpu", dtype=torch.float32)
        gpu32 = load_model(path, device="cuda", dtype=torch.float32)
        gpu16 = load_model(path, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, cpu.config.vocab_size, (1, 300), generator=torch.Generator().manual_seed(7))
    ref = cpu(ids, cpu.new_state(1))
    result = {"logits_rel_err_fp32": _rel(gpu32(ids.cuda(), gpu32.new_state(1)).cpu(), ref),
              "logits_rel_err_bf16": _rel(gpu16(ids.cuda(), gpu16.new_state(1)).cpu(), ref)}
    # The GPU's chunked prefill and token-by-token decode hand the state over exactly.
    state = gpu32.new_state(1)
    parts = [gpu32(ids[:, :200].cuda(), state)] + [gpu32(ids[:, t : t + 1].cuda(), state) for t in range(200, 300)]
    result["chunked_then_stepped_rel_err_fp32"] = _rel(torch.cat(parts, 1).cpu(), ref)

    def greedy(model, n=16):
        state = model.new_state(1)
        token = model(ids.to(model.device), state, last_only=True)[:, -1].argmax(-1, keepdim=True)
        out = [token.item()]
        for _ in range(n - 1):
            token = model(token, state)[:, -1].argmax(-1, keepdim=True)
            out.append(token.item())
        return out

    want = greedy(cpu)
    for name, model in [("fp32", gpu32), ("bf16", gpu16)]:
        got = greedy(model)
        result[f"greedy_agree_{name}"] = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
    log(f"check: {json.dumps(result)}")
    return result


def slice_config(layers: int):
    from kimi_desk.engine.random_checkpoint import kimi_linear_48b_config

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
    256 per layer), one embedding row, the MLA caches, and the KDA state read and written."""
    config = model.config
    total = 0
    for name, p in model.named_parameters():
        if name.endswith("embed_tokens.weight"):
            total += p.shape[1] * p.element_size()
        elif ".experts.w" in name:
            total += p.nbytes * config.num_experts_per_token // config.num_experts
        else:
            total += p.nbytes
    mla_layers = config.layer_kinds.count("mla")
    kda_layers = config.layer_kinds.count("kda")
    total += mla_layers * context * config.mla_latent_size * 2
    total += kda_layers * 2 * config.kda_num_heads * config.kda_head_dim**2 * 4
    return total


def time_ours(config, prefill_tokens: int, contexts: list[int], chunk: int, log) -> dict:
    import torch

    from kimi_desk.engine.random_checkpoint import random_model
    from kimi_desk.engine.state import KDAState

    torch.cuda.reset_peak_memory_stats()
    model = random_model(config, seed=0, dtype=torch.bfloat16, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (1, prefill_tokens), device="cuda", generator=gen)
    model(ids[:, :1024], model.new_state(1), last_only=True)  # compile the kernels
    state = model.new_state(1)
    _sync()
    start = time.perf_counter()
    for a in range(0, prefill_tokens, chunk):
        model(ids[:, a : a + chunk], state, last_only=True)
    _sync()
    out = {"prefill_tokens": prefill_tokens, "prefill_tok_s": prefill_tokens / (time.perf_counter() - start),
           "prefill_peak_gib": torch.cuda.max_memory_allocated() / 2**30, "decode": []}
    log(f"ours: prefill {out['prefill_tok_s']:,.0f} tok/s over {prefill_tokens:,} tokens")
    del state
    for context in contexts:
        state = model.new_state(1)
        for layer in state.layers:
            if isinstance(layer, KDAState):
                layer.recurrent.normal_(0, 0.1, generator=gen)
            else:
                layer.append(torch.randn(1, context, layer.latents.shape[-1], device="cuda", generator=gen,
                                         dtype=torch.bfloat16))
        state.position = context
        token = ids[:, :1]
        for _ in range(3):
            token = model(token, state)[:, -1].argmax(-1, keepdim=True)
        _sync()
        steps = 20
        start = time.perf_counter()
        for _ in range(steps):
            token = model(token, state)[:, -1].argmax(-1, keepdim=True)
        _sync()
        ms = (time.perf_counter() - start) / steps * 1e3
        out["decode"].append({"context": context, "ms_per_token": ms, "bytes": decode_bytes(model, context)})
        log(f"ours: decode at {context:,}: {ms:.2f} ms/token")
        del state
    out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del model
    torch.cuda.empty_cache()
    return out


def time_transformers(config, prefill_tokens: int, contexts: list[int], chunk: int, log) -> dict:
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
    with torch.no_grad():
        model(ids[:, :1024], use_cache=True, logits_to_keep=1)
        cache = None
        _sync()
        start = time.perf_counter()
        measured_at = None
        for a in range(0, max([prefill_tokens, *contexts]), chunk):
            o = model(ids[:, a : a + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache = o.past_key_values
            if a + chunk >= prefill_tokens and measured_at is None:
                _sync()
                measured_at = a + chunk
                out["prefill_tokens"] = measured_at
                out["prefill_tok_s"] = measured_at / (time.perf_counter() - start)
                log(f"transformers: prefill {out['prefill_tok_s']:,.0f} tok/s over {measured_at:,} tokens")
            reached = a + chunk
            for context in contexts:
                if reached == context:
                    token = ids[:, :1]
                    trial = _clone_cache(cache)
                    for _ in range(2):
                        o = model(token, past_key_values=trial, use_cache=True)
                    _sync()
                    steps = 5
                    start_decode = time.perf_counter()
                    for _ in range(steps):
                        o = model(token, past_key_values=trial, use_cache=True)
                        token = o.logits[:, -1].argmax(-1, keepdim=True)
                    _sync()
                    ms = (time.perf_counter() - start_decode) / steps * 1e3
                    out["decode"].append({"context": context, "ms_per_token": ms})
                    log(f"transformers: decode at {context:,}: {ms:.2f} ms/token")
                    del trial
    out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del model, cache
    torch.cuda.empty_cache()
    return out


def _clone_cache(cache):
    import copy

    return copy.deepcopy(cache)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=4, help="layers of the 48B model to build (default 4)")
    parser.add_argument("--prefill-tokens", type=int, default=32768)
    parser.add_argument("--contexts", default="8192,131072", help="cached tokens for decode, comma-separated")
    parser.add_argument("--chunk", type=int, default=8192, help="prefill chunk (default 8192)")
    parser.add_argument("--no-baseline", action="store_true", help="skip transformers + fla")
    parser.add_argument("--json", type=Path, default=None)


def main(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        raise ValueError("kimi-desk bench model needs a CUDA GPU")
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    config = slice_config(args.layers)
    result = {"benchmark": "model", "date": datetime.date.today().isoformat(),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers,
              "layer_kinds": config.layer_kinds, "copy_bytes_per_s": copy_bandwidth()}
    result["check"] = check_correctness(log)
    result["ours"] = time_ours(config, args.prefill_tokens, contexts, args.chunk, log)
    if not args.no_baseline:
        result["transformers"] = time_transformers(config, args.prefill_tokens, contexts, args.chunk, log)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown_table(result))
    return 0


def markdown_table(r: dict) -> str:
    bw = r["copy_bytes_per_s"]
    scale = 27 / r["layers"]
    lines = [f"{r['device']}, torch {r['torch']}, {r['date']}; slice of {r['layers']} layers "
             f"({' '.join(k.upper() for k in r['layer_kinds'])}) at the 48B shapes, random bf16 weights; "
             f"copy bandwidth {bw / 1e12:.2f} TB/s.", "",
             "| measure | kimi-desk | transformers + fla | ratio |", "|---|---|---|---|"]
    ours, base = r["ours"], r.get("transformers", {})
    b = f"{base['prefill_tok_s']:,.0f}" if base else "n/a"
    ratio = f"{ours['prefill_tok_s'] / base['prefill_tok_s']:.1f}x" if base else ""
    lines.append(f"| prefill tok/s ({r['layers']} layers, {ours['prefill_tokens']:,} tokens) | "
                 f"{ours['prefill_tok_s']:,.0f} | {b} | {ratio} |")
    for d in ours["decode"]:
        other = next((x for x in base.get("decode", []) if x["context"] == d["context"]), None)
        floor_ms = d["bytes"] / bw * 1e3
        lines.append(f"| decode ms/token at {d['context']:,} ({r['layers']} layers) | {d['ms_per_token']:.2f} "
                     f"({floor_ms / d['ms_per_token']:.0%} of roofline) | "
                     f"{other['ms_per_token']:.2f} | {other['ms_per_token'] / d['ms_per_token']:.1f}x |" if other else
                     f"| decode ms/token at {d['context']:,} ({r['layers']} layers) | {d['ms_per_token']:.2f} "
                     f"({floor_ms / d['ms_per_token']:.0%} of roofline) | n/a | |")
        lines.append(f"| decode tok/s at {d['context']:,}, scaled to 27 layers (x{scale:.2f}) | "
                     f"{1e3 / (d['ms_per_token'] * scale):.1f} | "
                     f"{1e3 / (other['ms_per_token'] * scale):.1f} | |" if other else
                     f"| decode tok/s at {d['context']:,}, scaled to 27 layers | {1e3 / (d['ms_per_token'] * scale):.1f} | n/a | |")
    lines.append(f"| peak GPU memory GiB | {ours['peak_gib']:.1f} | {base.get('peak_gib', float('nan')):.1f} | |")
    c = r["check"]
    lines += ["", f"Correctness (7-layer random model, GPU against CPU float32): logits rel. error "
              f"{c['logits_rel_err_fp32']:.1e} (fp32), {c['logits_rel_err_bf16']:.1e} (bf16); chunked then "
              f"token-by-token {c['chunked_then_stepped_rel_err_fp32']:.1e}; greedy tokens agreeing out of 16: "
              f"{c['greedy_agree_fp32']} (fp32), {c['greedy_agree_bf16']} (bf16)."]
    return "\n".join(lines)
