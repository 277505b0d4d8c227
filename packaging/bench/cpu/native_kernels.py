"""Our AVX2 kernels (kernels/native.py) against the PyTorch operators they replace, on this CPU, over the
sizes that change their speed; each result checked against float64 first.

    python packaging/bench/cpu/native_kernels.py [--json OUT]

- int4 products (kernels/quant/avx2.py against `_weight_int4pack_mm_for_cpu`): the 48B model's
  matrices (an expert's joined gate-up and its down, a KDA layer's joined projections in groups of 128,
  the output head in groups of 32) and 1, 8 and 512 rows (a decode step, a few tokens, a reading chunk); GB/s is the int4 codes
  read per second (rows x codes for several rows).
- MLA decode attention over a float32 cache (kernels/mla/avx2.py against the keys-major products of
  torch_attention.py): the demo model's 5 heads and the 48B model's 32, 1 and 3 tokens, 4k to 214k
  cached keys.
- KDA's decode step (kernels/kda/avx2.py against the layer's PyTorch form: convolutions, norms, gate,
  recurrence, output norm; engine/kda.py with its projections given and o_proj left out): the 48B
  model's 32 heads of 128 and the demo model's 5 of 64, 1 and 3 tokens; GB/s is the float32 state read
  and written once a token.

Times: the best of 5 after a warm-up, on all the threads PyTorch uses.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

INT4_SHAPES = (("expert gate-up", 2048, 2304), ("expert down", 2304, 1024), ("KDA projections", 12288, 2304))
HEAD = ("output head", 163840, 2304)
ROWS = (1, 8, 512)
# (label, heads, latent, rope) and the cache lengths and query tokens swept (rows beyond the kernel's
# kernels/mla/avx2.py MAX_ROWS, such as 3 tokens of the 48B model's 32 heads, are skipped).
MLA_SHAPES = (("demo model", 5, 128, 32), ("48B model", 32, 512, 64))
MLA_KEYS = (4096, 32768, 214000)
MLA_TOKENS = (1, 3)
KDA_SHAPES = (("48B model", 2304, 32, 128), ("demo model", 320, 5, 64))  # (label, hidden, heads, head dim)
KDA_TOKENS = (1, 3)


def best_ms(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times) * 1e3


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def int4_rows() -> list[dict]:
    from kimi_desk.kernels.quant import avx2, dequantize_int4_groups, quantize_int4_groups
    from kimi_desk.kernels.quant.cpu import cpu_int4_layout, pack_int4_for_cpu

    layout = cpu_int4_layout()
    out = []
    from kimi_desk.engine.quantize import HEAD_INT4_GROUP

    for label, O, D in (*INT4_SHAPES, HEAD):
        group = HEAD_INT4_GROUP if (label, O, D) == HEAD else None  # the head's finer groups
        codes, scale, zero = quantize_int4_groups(torch.randn(O, D) * 0.02, group)
        weight = pack_int4_for_cpu(codes, scale, zero)
        exact = dequantize_int4_groups(codes, scale, zero, torch.float64)
        for rows in ROWS if (label, O, D) != HEAD else (1,):
            x = torch.randn(rows, D)
            want = x.double() @ exact.t()
            ours = lambda: avx2.int4_linear_avx2(x, weight.packed, weight.scales_and_zeros, layout.rows, weight.group)  # noqa: E731
            theirs = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(  # noqa: E731
                x.bfloat16(), weight.packed, weight.group, weight.scales_and_zeros
            )
            gb = rows * O * D / 2 / 1e9
            ms_ours, ms_theirs = best_ms(ours), best_ms(theirs)
            out.append(
                dict(
                    matrix=f"{label} [{O} x {D}]",
                    rows=rows,
                    ours_ms=ms_ours,
                    operator_ms=ms_theirs,
                    ours_gb_s=gb / ms_ours * 1e3,
                    operator_gb_s=gb / ms_theirs * 1e3,
                    ours_rel_error=rel_err(ours()[:, :O], want),
                    operator_rel_error=rel_err(theirs()[:, :O], want),
                )
            )
            print(json.dumps(out[-1]), flush=True)
    return out


def mla_rows() -> list[dict]:
    from kimi_desk.kernels.mla import avx2
    from kimi_desk.kernels.mla.naive import mla_attention_reference
    from kimi_desk.kernels.mla.torch_attention import CPU_BLOCK_BYTES, mla_attention_cpu

    out = []
    for label, heads, latent, rope in MLA_SHAPES:
        width = latent + rope
        for keys in MLA_KEYS:
            cache = torch.randn(1, keys + 8, width)
            for tokens in MLA_TOKENS:
                if not avx2.takes(cache, latent, tokens * heads):
                    continue
                q = torch.randn(1, tokens, heads, width)
                scale = width**-0.5
                start = keys - tokens
                want = mla_attention_reference(q, cache[:, :keys], start, latent, scale)
                block = CPU_BLOCK_BYTES // (width * 4)
                ours = lambda: mla_attention_cpu(q, cache, start, latent, scale)  # noqa: E731
                theirs = lambda: mla_attention_cpu(q, cache, start, latent, scale, block=block)  # noqa: E731
                ms_ours, ms_theirs = best_ms(ours), best_ms(theirs)
                out.append(
                    dict(
                        model=label,
                        keys=keys,
                        rows=tokens * heads,
                        ours_ms=ms_ours,
                        products_ms=ms_theirs,
                        ours_gb_s=keys * width * 4 / 1e9 / ms_ours * 1e3,
                        ours_rel_error=rel_err(ours(), want),
                    )
                )
                print(json.dumps(out[-1]), flush=True)
    return out


def kda_rows() -> list[dict]:
    from torch import nn

    from kimi_desk.engine.config import KimiLinearConfig
    from kimi_desk.engine.kda import KimiDeltaAttention
    from kimi_desk.kernels.kda import avx2

    out = []
    for label, hidden, heads, dim in KDA_SHAPES:
        config = KimiLinearConfig(hidden_size=hidden, kda_num_heads=heads, kda_head_dim=dim, vocab_size=16)
        layer = KimiDeltaAttention(config)
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn_like(p) * 0.3)
        layer.o_proj = nn.Identity()  # the products are the int4 kernels' part, timed above
        P = heads * dim
        for tokens in KDA_TOKENS:
            raw = torch.randn(1, tokens, 5 * P + heads).split([P] * 5 + [heads], dim=-1)
            layer.input_projections = lambda x, _raw=raw: _raw
            x = torch.zeros(1, tokens, hidden)
            timed, results = {}, {}
            first = layer.new_state(1, torch.float32, "cpu")
            first.recurrent.normal_(0, 0.1)
            first.conv.normal_()
            for name, takes in (("ours", avx2.takes), ("pytorch", lambda *_: False)):
                state = first.clone()
                avx2_takes, avx2.takes = avx2.takes, takes
                try:
                    with torch.inference_mode():
                        results[name] = layer(x, state.clone())
                        timed[name] = best_ms(lambda: layer(x, state))  # noqa: B023
                finally:
                    avx2.takes = avx2_takes
            out.append(
                dict(
                    model=label,
                    heads=heads,
                    head_dim=dim,
                    tokens=tokens,
                    ours_ms=timed["ours"],
                    pytorch_ms=timed["pytorch"],
                    ours_gb_s=2 * heads * dim * dim * 4 * tokens / 1e9 / timed["ours"] * 1e3,
                    rel_difference=rel_err(results["ours"], results["pytorch"]),
                )
            )
            print(json.dumps(out[-1]), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    from kimi_desk.kernels.kda import avx2 as kda_avx2
    from kimi_desk.kernels.mla import avx2 as mla_avx2
    from kimi_desk.kernels.quant import avx2

    if avx2.library() is None or mla_avx2.library() is None or kda_avx2.library() is None:
        raise SystemExit(f"the kernels do not run here: {avx2.quantized_backend()}")
    result = dict(
        machine=f"{platform.processor() or platform.machine()}, {torch.backends.cpu.get_cpu_capability()}",
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        int4=int4_rows(),
        mla=mla_rows(),
        kda=kda_rows(),
    )
    print(f"\n{result['machine']}, {result['threads']} threads, torch {result['torch']}, {result['date']}\n")
    print(
        "| int4 matrix | rows | ours ms (GB/s) | PyTorch's operator ms (GB/s) | ours / operator | rel. error ours, operator |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for r in result["int4"]:
        print(
            f"| {r['matrix']} | {r['rows']} | {r['ours_ms']:.3f} ({r['ours_gb_s']:.1f}) | "
            f"{r['operator_ms']:.3f} ({r['operator_gb_s']:.1f}) | {r['operator_ms'] / r['ours_ms']:.2f}x faster | "
            f"{r['ours_rel_error']:.1e}, {r['operator_rel_error']:.1e} |"
        )
    print(
        "\n| MLA cache | cached keys | rows | ours ms (GB/s of cache) | PyTorch's products ms | ours / products | rel. error |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in result["mla"]:
        print(
            f"| {r['model']} | {r['keys']:,} | {r['rows']} | {r['ours_ms']:.2f} ({r['ours_gb_s']:.1f}) | "
            f"{r['products_ms']:.2f} | {r['products_ms'] / r['ours_ms']:.2f}x faster | {r['ours_rel_error']:.1e} |"
        )
    print(
        "\n| KDA decode step | heads x dim | tokens | ours ms (GB/s of state) | PyTorch's form ms | ours / PyTorch | rel. difference |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in result["kda"]:
        print(
            f"| {r['model']} | {r['heads']} x {r['head_dim']} | {r['tokens']} | {r['ours_ms']:.3f} ({r['ours_gb_s']:.1f}) | "
            f"{r['pytorch_ms']:.3f} | {r['pytorch_ms'] / r['ours_ms']:.2f}x faster | {r['rel_difference']:.1e} |"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
