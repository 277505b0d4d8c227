"""GPU check of the grouped MoE GEMM for prefill (kernels/moe/grouped.py) at the 48B shapes: correctness
against the grouped PyTorch path and float64, then time per chunk size and launch setting, beside the
grouped PyTorch path it replaces.

Run from the repo root on the device: source packaging/source_shim.sh && python3 packaging/bench/gpu_checks/moe_grouped.py
"""

import time

import torch
import triton

from kimi_desk.kernels.moe.grouped import DEFAULT_CONFIG, routed_experts_grouped_triton
from kimi_desk.kernels.moe.naive import routed_experts_grouped
from kimi_desk.kernels.quant import dequantize_rows, quantize_fp8_rows

dev = "cuda"
E, D, I, k = 256, 2304, 1024, 8


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


print(
    f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; DEFAULT_CONFIG {DEFAULT_CONFIG}"
)
gen = torch.Generator(device=dev).manual_seed(0)
w1, w3 = (torch.randn(E, I, D, device=dev, generator=gen) / D**0.5 for _ in range(2))
w2 = torch.randn(E, D, I, device=dev, generator=gen) / I**0.5
(q1, s1), (q2, s2), (q3, s3) = (quantize_fp8_rows(w) for w in (w1, w2, w3))
b1, b2, b3 = (w.bfloat16() for w in (w1, w2, w3))
del w1, w2, w3
fp8 = (q1, q2, q3)
scales = (s1, s2, s3)


def inputs(N, seed):
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(N, D, device=dev, generator=g).bfloat16()
    # Router-like choice: k distinct experts per token, some experts more popular than others.
    logits = torch.randn(N, E, device=dev, generator=g) + torch.linspace(0, 2, E, device=dev)
    ids = logits.topk(k, dim=-1).indices
    weights = torch.rand(N, k, device=dev, generator=g) + 0.1
    return x, ids, weights


# Correctness: a small N against float64 on the same rounded weights; a full chunk against the PyTorch path.
x, ids, wts = inputs(40, 1)
exact = [dequantize_rows(q, s, torch.float64) for q, s in zip(fp8, scales)]
ref = torch.zeros(40, D, dtype=torch.float64, device=dev)
for n in range(40):
    for j in range(k):
        e = ids[n, j]
        h = torch.nn.functional.silu(exact[0][e] @ x[n].double()) * (exact[2][e] @ x[n].double())
        ref[n] += wts[n, j].double() * (exact[1][e] @ h)
got = routed_experts_grouped_triton(x, ids, wts, *fp8, scales=scales)
print(f"fp8, N=40: rel err vs float64 {rel(got, ref):.2e}")
for N in (2048, 8192):
    x, ids, wts = inputs(N, N)
    for name, ws, sc in (("bf16", (b1, b2, b3), None), ("fp8", fp8, scales)):
        got = routed_experts_grouped_triton(x, ids, wts, *ws, scales=sc)
        want = routed_experts_grouped(x, ids, wts, *ws, scales=sc)
        again = routed_experts_grouped_triton(x, ids, wts, *ws, scales=sc)
        print(
            f"{name}, N={N}: rel err vs grouped PyTorch {rel(got, want):.2e}, NaN {torch.isnan(got).any().item()}, "
            f"same on a second call {torch.equal(got, again)}"
        )

# Timing.
print(f"\n{'N':>5} {'weights':>7} {'config':>44} {'ms':>8} {'TFLOP/s':>8}   grouped PyTorch ms")
configs = [
    {},
    dict(block_m=128, num_warps=8),
    dict(block_m=64, block_n=64, num_warps=4),
    dict(block_m=64, block_k=128, num_stages=2),
    dict(block_m=128, block_n=64, num_warps=4),
    dict(block_m=64, num_stages=4),
]
for N in (2048, 8192):
    x, ids, wts = inputs(N, N + 7)
    flops = 2 * N * k * 3 * D * I
    for name, ws, sc in (("bf16", (b1, b2, b3), None), ("fp8", fp8, scales)):
        torch.cuda.synchronize()
        start = time.perf_counter()
        routed_experts_grouped(x, ids, wts, *ws, scales=sc)
        torch.cuda.synchronize()
        torch_ms = (time.perf_counter() - start) * 1e3
        for i, cfg in enumerate(configs):
            try:
                fn = lambda: routed_experts_grouped_triton(x, ids, wts, *ws, scales=sc, config=cfg)
                out = fn()
                ok = rel(out, routed_experts_grouped_triton(x, ids, wts, *ws, scales=sc)) < 1e-2
                ms = triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median")
                line = f"{N:>5} {name:>7} {str(cfg or 'default'):>44} {ms:8.2f} {flops / ms / 1e9:8.0f}{'' if ok else ' BAD'}"
                print(line + (f"   {torch_ms:.1f}" if i == 0 else ""))
            except Exception as exc:
                print(f"{N:>5} {name:>7} {str(cfg):>44} {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
print("OK")
