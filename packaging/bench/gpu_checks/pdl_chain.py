"""GPU check: programmatic dependent launch (PDL) for the decode GEMVs. A chain of dependent fp8 GEMVs
at the 48B decode shapes (each product reads the previous one's output), captured in a CUDA graph, with
PDL off and on. Checks the result bit for bit against the chain without PDL; prints a table last. (Two
more variants, reading each program's first weight tile or prefetching its weights into L2 before the
wait, measured no faster on 2026-11-27 and were removed from the kernel: BENCHMARKS.md.)
Run from the repo root on the device: source packaging/source_shim.sh && python3 packaging/bench/gpu_checks/pdl_chain.py"""

import contextlib

import torch
import triton

from kimi_desk.kernels import without_pdl
from kimi_desk.kernels.quant import quantize_fp8_rows
from kimi_desk.kernels.quant.gemv import row_scaled_gemv

dev = "cuda"
torch.manual_seed(0)
# One KDA layer's products at decode: the joined input projections, the gates' second halves (two
# 128 -> 4096 maps, block-diagonal: here one 8192 x 256), the output projection. 20 layers' worth of
# distinct weights, more than L2 holds.
layer = [(12544, 2304), (8192, 256), (2304, 4096)]
weights = [[quantize_fp8_rows(torch.randn(O, D, device=dev) / D**0.5) for O, D in layer] for _ in range(20)]
total_bytes = sum(q.numel() for w in weights for q, _ in w)
x0 = torch.randn(1, 2304, device=dev).bfloat16()


def chain():
    h = x0
    for w in weights:
        (q1, s1), (q2, s2), (q3, s3) = w
        a = row_scaled_gemv(h, q1, s1)  # [1, 12544]
        b = row_scaled_gemv(a[:, 4096:4352], q2, s2)  # [1, 8192]
        h = row_scaled_gemv(a[:, :4096], q3, s3)  # [1, 2304]
        h = h + b[:, :2304] * 1e-3  # a PyTorch op between layers: it breaks the chain of early starts
    return h


def graphed():
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        chain()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = chain()
    return g, out


with without_pdl():
    ref = chain()
rows = []
for name, switch in (("no PDL", without_pdl), ("PDL", contextlib.nullcontext)):
    with switch():
        eager = chain()
        g, out = graphed()
    g.replay()
    torch.cuda.synchronize()
    same = torch.equal(eager, ref) and torch.equal(out, ref)
    ms = triton.testing.do_bench(g.replay, warmup=50, rep=500, return_mode="median")
    rows.append((name, ms * 1e3, same))
print(
    f"chain of {3 * len(weights)} dependent fp8 GEMVs + {len(weights)} torch adds, {total_bytes / 1e6:.0f} MB of weights, "
    f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}"
)
print("| variant | us per chain | us per GEMV | GB/s | bit-equal to no PDL |")
print("|---|---|---|---|---|")
for name, us, same in rows:
    print(f"| {name} | {us:.1f} | {us / (3 * len(weights)):.2f} | {total_bytes / us / 1e3:.0f} | {same} |")
assert all(same for *_, same in rows), "a PDL variant differs"
