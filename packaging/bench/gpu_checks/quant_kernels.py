"""GPU check of the fp8, int8 and int4 kernels side by side at the 48B shapes, with launch variants: the
decode GEMV, the MoE GEMV of one token, the prefill grouped GEMM of 8192 tokens. Each variant is
checked against float64 on the dequantized weights, then timed (graph replay for the GEMVs).

    source packaging/source_shim.sh && python3 packaging/bench/gpu_checks/quant_kernels.py \
        [--sections gemvs,moe,grouped] [--formats fp8,int8,int4]
"""

import torch
import triton

import kimi_desk.kernels.moe.gemv as moe_gemv
from kimi_desk.kernels.moe.grouped import routed_experts_grouped_triton
from kimi_desk.kernels.quant import (
    dequantize_int4_groups,
    dequantize_rows,
    quantize_fp8_rows,
    quantize_int4_groups,
    quantize_int8_rows,
)
from kimi_desk.kernels.quant.gemv import int4_gemv, row_scaled_gemv

FORMATS = ["fp8", "int8", "int4"]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def quantized(fmt, w):
    """(args after x for the GEMV, the float64 weight they stand for)."""
    if fmt == "int4":
        p, s, z = quantize_int4_groups(w)
        return (p, s, z), dequantize_int4_groups(p, s, z, torch.float64)
    q, s = (quantize_int8_rows if fmt == "int8" else quantize_fp8_rows)(w)
    return (q, s), dequantize_rows(q, s, torch.float64)


def graph_us(fn):
    fn()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return triton.testing.do_bench(g.replay, warmup=25, rep=200, return_mode="median") * 1e3


def gemvs():
    print("decode GEMV, one token, bf16 x (graph replay)")
    print(f"{'O x D':>14} {'fmt':>5} {'config':>34} {'rel err':>9} {'us':>7} {'GB/s':>6}")
    # fp8 and int8: the one-token CUDA-core form (default) beside the dots; int4: its dots' tile shapes.
    common = [
        dict(),
        dict(cores=False, block_o=32, block_d=128),
        dict(block_d=256),
        dict(block_o=32),
        dict(block_d=256, block_o=16, num_warps=8),
    ]
    variants = [
        dict(),
        dict(block_o=32),
        dict(block_o=128, num_warps=8),
        dict(num_stages=3),
        dict(min_programs=528),
    ]
    for O, D in [(12288, 2304), (6464, 2304), (2304, 4096), (2304, 2304), (163840, 2304)]:
        w = torch.randn(O, D, device="cuda")
        x = torch.randn(1, D, device="cuda").bfloat16()
        for fmt in FORMATS:
            args, exact = quantized(fmt, w)
            want = x.double() @ exact.T
            nbytes = sum(a.numel() * a.element_size() for a in args)
            for config in variants if fmt == "int4" else common:
                fn = (
                    (lambda: int4_gemv(x, *args, config=config))
                    if fmt == "int4"
                    else (lambda: row_scaled_gemv(x, *args, config=config))
                )
                err = rel(fn(), want)
                us = graph_us(fn)
                print(f"{f'{O}x{D}':>14} {fmt:>5} {str(config):>34} {err:9.1e} {us:7.1f} {nbytes / us / 1e3:6.0f}")
        del w


def moe():
    print("\nMoE GEMV, one token, 8 of 256 experts (graph replay)")
    E, D, I, k = 256, 2304, 1024, 8
    ws = [
        torch.randn(E, I, D, device="cuda") / D**0.5,
        torch.randn(E, D, I, device="cuda") / I**0.5,
        torch.randn(E, I, D, device="cuda") / D**0.5,
    ]
    x = torch.randn(1, D, device="cuda").bfloat16()
    ids = torch.randperm(E, device="cuda")[:k][None]
    weights = torch.rand(1, k, device="cuda") + 0.1
    for fmt in FORMATS:
        parts = [quantized(fmt, w) for w in ws]
        codes = [p[0][0] for p in parts]
        scales = tuple(p[0][1:] if fmt == "int4" else p[0][1] for p in parts)
        exact = [p[1] for p in parts]
        want = sum(
            weights[0, j].double()
            * (exact[1][e] @ (torch.nn.functional.silu(exact[0][e] @ x[0].double()) * (exact[2][e] @ x[0].double())))
            for j, e in enumerate(ids[0].tolist())
        )
        variants = [({}, {})]
        if fmt == "int4":
            # Tiles of several groups (block_d of gate/up, block_i of down: 128 inputs a group here).
            variants += [
                (dict(block_d=128, block_i=16, num_warps=4), dict(block_i=128, block_d=64)),
                (dict(block_i=64), {}),
                (dict(block_d=1024), dict(block_i=512)),
                (dict(block_i=16, block_d=1024), dict(block_d=16, block_i=512)),
                ({}, dict(block_d=64, num_warps=8)),
            ]
        for gate_up, down in variants:
            fn = lambda: moe_gemv.routed_experts_gemv(x, ids, weights, *codes, scales=scales, configs=(gate_up, down))  # noqa: E731
            err = rel(fn()[0], want)
            us = graph_us(fn)
            nbytes = k * sum(c[0].numel() * c.element_size() for c in codes)
            print(
                f"{fmt:>5} gate/up {str(gate_up):>44} down {str(down):>40} rel err {err:8.1e} {us:7.1f} us"
                f" {nbytes / us / 1e3:6.0f} GB/s"
            )


def grouped():
    print("\nMoE grouped GEMM, 8192 tokens, 8 of 256 experts")
    E, D, I, k, N = 256, 2304, 1024, 8, 8192
    ws = [
        torch.randn(E, I, D, device="cuda") / D**0.5,
        torch.randn(E, D, I, device="cuda") / I**0.5,
        torch.randn(E, I, D, device="cuda") / D**0.5,
    ]
    x = torch.randn(N, D, device="cuda").bfloat16()
    ids = torch.stack([torch.randperm(E, device="cuda")[:k] for _ in range(N)])
    weights = torch.rand(N, k, device="cuda") + 0.1
    for fmt in ("fp8", "int8", "int4"):
        parts = [quantized(fmt, w) for w in ws]
        codes = [p[0][0] for p in parts]
        scales = tuple(p[0][1:] if fmt == "int4" else p[0][1] for p in parts)
        small = slice(0, 64)
        exact = [p[1].float() for p in parts]
        from kimi_desk.kernels.moe.naive import routed_experts_grouped

        want = routed_experts_grouped(x[small].float(), ids[small], weights[small], *exact)
        variants = [{}]
        if fmt == "int4":
            variants += [
                dict(block_m=128, num_warps=8),
                dict(block_m=64, block_n=128),
                dict(num_stages=4),
                dict(num_warps=4),
                dict(block_k=64),
                dict(block_m=128, block_n=128, num_warps=8),
            ]
        for config in variants:
            err = rel(
                routed_experts_grouped_triton(
                    x[small], ids[small], weights[small], *codes, scales=scales, config=config
                ),
                want,
            )
            ms = triton.testing.do_bench(
                lambda: routed_experts_grouped_triton(x, ids, weights, *codes, scales=scales, config=config),
                warmup=5,
                rep=50,
                return_mode="median",
            )
            flops = 6 * N * k * D * I
            print(f"{fmt:>5} {str(config):>44} rel err {err:8.1e} {ms:7.2f} ms {flops / ms / 1e9:6.0f} TFLOP/s")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="gemvs,moe,grouped", help="which of gemvs, moe, grouped to run")
    parser.add_argument("--formats", default="fp8,int8,int4")
    args = parser.parse_args()
    FORMATS = args.formats.split(",")
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    for section in args.sections.split(","):
        {"gemvs": gemvs, "moe": moe, "grouped": grouped}[section]()
