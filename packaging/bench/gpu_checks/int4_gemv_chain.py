"""GPU check: the int4 decode GEMV (kernels/quant/gemv.py) as a decode step runs it, back to back: 40
products of one token recorded in one CUDA graph, on rotating copies of the weight (more bytes than L2
holds), with programmatic dependent launch as in the model; microseconds per product and the bandwidth
they reach, for launch settings side by side at the 48B decode shapes. Checked against float64 first.

    source packaging/source_shim.sh && python3 packaging/bench/gpu_checks/int4_gemv_chain.py
"""

import itertools

import torch
import triton

from kimi_desk.kernels.quant import dequantize_int4_groups, quantize_int4_groups
from kimi_desk.kernels.quant.gemv import int4_gemv

dev = "cuda"
SHAPES = [(12288, 2304), (6464, 2304), (2304, 4096), (2304, 2304), (1024, 2304)]
CONFIGS = (
    [dict()]
    + [
        dict(block_o=bo, num_stages=s, min_programs=m)
        for bo, s, m in itertools.product((32, 64, 128), (2, 4), (132, 528))
    ]
    + [dict(block_o=128, num_warps=8, min_programs=m) for m in (132, 264)]
)


def chain_us(fn, copies, calls=40):
    fn(copies[0])
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(copies[i % len(copies)])
    return triton.testing.do_bench(g.replay, warmup=5, rep=100, return_mode="median") * 1e3 / calls


print(torch.cuda.get_device_name())
for O, D in SHAPES:
    w = torch.randn(O, D, device=dev) / D**0.5
    packed, scale, zero = quantize_int4_groups(w)
    nbytes = packed.numel() + 2 * scale.numel() * 2
    copies = [(packed.clone(), scale.clone(), zero.clone()) for _ in range(max(2, 160_000_000 // nbytes))]
    x = torch.randn(1, D, device=dev).bfloat16()
    ref = x.double() @ dequantize_int4_groups(packed, scale, zero, torch.float64).T
    rows = []
    for config in CONFIGS:
        try:
            y = int4_gemv(x, packed, scale, zero, config)
            err = ((y.double() - ref).norm() / ref.norm()).item()
            us = chain_us(lambda c, config=config: int4_gemv(x, *c, config), copies)
        except Exception as error:  # a setting this Triton cannot compile: say so, go on
            print(f"{O}x{D} {config}: {type(error).__name__}: {str(error)[:120]}")
            continue
        rows.append((us, config, err))
    rows.sort(key=lambda r: r[0])
    default = next(r for r in rows if not r[1])
    print(f"\n{O} x {D}: {nbytes / 1e6:.1f} MB; default {default[0]:.2f} us ({nbytes / default[0] / 1e3:.0f} GB/s)")
    for us, config, err in rows[:6]:
        print(f"  {us:7.2f} us {nbytes / us / 1e3:6.0f} GB/s  rel err {err:.1e}  {config or 'default'}", flush=True)
