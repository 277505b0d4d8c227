"""GPU check of the fp8 GEMV and fp8 MoE GEMV: correctness at the 48B shapes, CUDA-graph replay, timing.
Run from the repo root on the device: source packaging/source_shim.sh && python3 packaging/bench/gpu_checks/fp8_gemv.py"""

import torch
import triton

from kimi_desk.kernels.moe.gemv import routed_experts_gemv
from kimi_desk.kernels.moe.naive import routed_experts_grouped
from kimi_desk.kernels.quant import dequantize_rows, quantize_fp8_rows, row_scaled_linear_torch
from kimi_desk.kernels.quant.gemv import launch_shape, row_scaled_gemv

dev = "cuda" if torch.cuda.is_available() else "cpu"
small = dev == "cpu"


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


shapes = (
    [(4096, 2304), (2304, 2304), (32, 2304), (1024, 2304), (2304, 4096), (163840, 2304)] if not small else [(96, 200)]
)
print(f"{'O':>7} {'D':>5} {'N':>3} {'dtype':>5} {'grid':>8} {'relerr':>9} {'us':>8} {'GB/s':>7} {'torch us':>9}")
for O, D in shapes:
    w = torch.randn(O, D, device=dev)
    q, s = quantize_fp8_rows(w)
    del w
    for N in (1, 16):
        for dt in (torch.bfloat16, torch.float32):
            x = torch.randn(N, D, device=dev).to(dt)
            ref = x.double() @ dequantize_rows(q, s, torch.float64).T
            y = row_scaled_gemv(x, q, s)
            err = rel(y, ref)
            assert not torch.isnan(y).any() and err < (4e-3 if dt == torch.bfloat16 else 1e-5), err
            _, _, n_o, sp, _ = launch_shape(O, D)
            t = tt = float("nan")
            if not small and dt == torch.bfloat16:
                # graph replay: rotate nothing, weights > L2 for the big shapes only
                g = torch.cuda.CUDAGraph()
                st = torch.cuda.Stream()
                st.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(st):
                    row_scaled_gemv(x, q, s)
                torch.cuda.current_stream().wait_stream(st)
                with torch.cuda.graph(g):
                    yg = row_scaled_gemv(x, q, s)
                g.replay()
                torch.cuda.synchronize()
                assert torch.equal(yg, y), "graph replay differs (nondeterministic?)"
                t = triton.testing.do_bench(g.replay, warmup=25, rep=200, return_mode="median") * 1e3
                tt = (
                    triton.testing.do_bench(
                        lambda: row_scaled_linear_torch(x, q, s), warmup=25, rep=200, return_mode="median"
                    )
                    * 1e3
                )
            print(
                f"{O:>7} {D:>5} {N:>3} {'bf16' if dt == torch.bfloat16 else 'fp32':>5} {f'{n_o}x{sp}':>8} {err:9.2e} {t:8.2f} {O * D / t / 1e3:7.0f} {tt:9.2f}"
            )
# MoE fp8
E, D, I, k = (256, 2304, 1024, 8) if not small else (8, 64, 32, 2)
w1, w3 = (torch.randn(E, I, D, device=dev) / D**0.5 for _ in range(2))
w2 = torch.randn(E, D, I, device=dev) / I**0.5
(q1, s1), (q2, s2), (q3, s3) = (quantize_fp8_rows(w) for w in (w1, w2, w3))
del w1, w2, w3
for N in (1, 4):
    x = torch.randn(N, D, device=dev).bfloat16()
    ids = torch.stack([torch.randperm(E, device=dev)[:k] for _ in range(N)])
    wts = torch.rand(N, k, device=dev) + 0.1
    got = routed_experts_gemv(x, ids, wts, q1, q2, q3, scales=(s1, s2, s3))
    want = routed_experts_grouped(x.float(), ids, wts, q1, q2, q3, scales=(s1, s2, s3))
    err = rel(got, want)
    t = float("nan")
    if not small:
        t = (
            triton.testing.do_bench(
                lambda: routed_experts_gemv(x, ids, wts, q1, q2, q3, scales=(s1, s2, s3)),
                warmup=25,
                rep=200,
                return_mode="median",
            )
            * 1e3
        )
    print(
        f"moe fp8 N={N}: relerr vs grouped fp32 {err:.2e}, {t:.2f} us, {3 * I * D * k * N / t / 1e3:.0f} GB/s (distinct-expert bytes)"
    )
    assert err < 2e-2
print("OK")

# Launch variants at the decode shapes (bf16, one token), each checked against float64 and timed in a
# CUDA graph. Measured 2026-11-27 (H100): the split-K with a sum and a cast after the kernel against the
# last split reducing in the kernel (now the only form) and the other columns below; see gemv.py.
if not small:
    variants = {
        "default": {},
        "no split, 16 rows a block": {"min_programs": 1, "block_o": 16},
        "no split, 32 rows, 4 stages": {"min_programs": 1, "block_o": 32, "num_stages": 4},
        "split-K, 256 wide": {"block_d": 256},
        "split-K, 8 warps": {"num_warps": 8},
        "32 rows, 4 stages": {"block_o": 32, "num_stages": 4},
    }
    print(f"\n{'O':>7} {'D':>5}  " + "  ".join(f"{name[:24]:>24}" for name in variants))
    for O, D in [
        (4096, 2304),
        (2304, 2304),
        (128, 2304),
        (32, 2304),
        (1024, 2304),
        (2304, 4096),
        (12288, 2304),
        (6464, 2304),
        (2048, 2304),
        (18432, 2304),
    ]:
        q, s = quantize_fp8_rows(torch.randn(O, D, device=dev))
        x = torch.randn(1, D, device=dev).to(torch.bfloat16)
        ref = x.double() @ dequantize_rows(q, s, torch.float64).T
        cells = []
        for name, config in variants.items():
            try:
                y = row_scaled_gemv(x, q, s, config=config)
                err = rel(y, ref)
                g = torch.cuda.CUDAGraph()
                st = torch.cuda.Stream()
                st.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(st):
                    row_scaled_gemv(x, q, s, config=config)
                torch.cuda.current_stream().wait_stream(st)
                with torch.cuda.graph(g):
                    yg = row_scaled_gemv(x, q, s, config=config)
                g.replay()
                torch.cuda.synchronize()
                t = triton.testing.do_bench(g.replay, warmup=25, rep=200, return_mode="median") * 1e3
                cells.append(f"{t:7.2f} us {err:.0e}{'' if torch.equal(yg, y) and err < 4e-3 else ' BAD'}")
            except Exception as exc:  # a setting that does not compile is a result too
                cells.append(f"{type(exc).__name__[:24]:>24}")
        print(f"{O:>7} {D:>5}  " + "  ".join(f"{c:>24}" for c in cells))

# The routed experts of one token (8 routed + the shared one stacked after them, engine/fuse.py), fp8,
# with the launch settings of kernels/moe/gemv.py varied; in a CUDA graph.
if not small:
    from kimi_desk.kernels.moe import gemv as moe_gemv

    E1 = E + 1
    q1x, q2x, q3x = (torch.cat([q.view(torch.uint8), q[:1].view(torch.uint8)]).view(q.dtype) for q in (q1, q2, q3))
    s1x, s2x, s3x = (torch.cat([s, s[:1]]) for s in (s1, s2, s3))
    x = torch.randn(1, D, device=dev).bfloat16()
    ids = torch.cat([torch.randperm(E, device=dev)[:k], torch.tensor([E], device=dev)])[None]
    wts = torch.rand(1, k + 1, device=dev) + 0.1
    want = routed_experts_grouped(x.float(), ids, wts, q1x, q2x, q3x, scales=(s1x, s2x, s3x))
    floor_us = 3 * I * D * (k + 1) / 3.0e12 * 1e6
    print(f"\nmoe fp8, one token, 9 experts (floor {floor_us:.1f} us at 3.0 TB/s): gate/up config, down config")
    base_gu, base_dn = dict(moe_gemv.GATE_UP_CONFIG), dict(moe_gemv.DOWN_CONFIG)
    for gu, dn in [
        ({}, {}),
        ({"block_i": 32, "block_d": 128}, {}),
        ({"block_i": 8, "block_d": 512}, {}),
        ({"block_i": 16, "block_d": 256, "num_warps": 8}, {}),
        ({"block_i": 32, "block_d": 256, "num_warps": 8}, {}),
        ({}, {"block_d": 16, "block_i": 512}),
        ({}, {"block_d": 64, "block_i": 128}),
        ({}, {"block_d": 32, "block_i": 256, "num_warps": 8}),
    ]:
        moe_gemv.GATE_UP_CONFIG.update({**base_gu, **gu})
        moe_gemv.DOWN_CONFIG.update({**base_dn, **dn})
        try:
            got = routed_experts_gemv(x, ids, wts, q1x, q2x, q3x, scales=(s1x, s2x, s3x))
            g = torch.cuda.CUDAGraph()
            st = torch.cuda.Stream()
            st.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(st):
                routed_experts_gemv(x, ids, wts, q1x, q2x, q3x, scales=(s1x, s2x, s3x))
            torch.cuda.current_stream().wait_stream(st)
            with torch.cuda.graph(g):
                routed_experts_gemv(x, ids, wts, q1x, q2x, q3x, scales=(s1x, s2x, s3x))
            t = triton.testing.do_bench(g.replay, warmup=25, rep=200, return_mode="median") * 1e3
            print(f"  {str(gu or 'default'):>50} {str(dn or 'default'):>50} {t:7.2f} us  err {rel(got, want):.1e}")
        except Exception as exc:
            print(f"  {str(gu):>50} {str(dn):>50} {type(exc).__name__}: {str(exc)[:80]}")
    moe_gemv.GATE_UP_CONFIG.update(base_gu)
    moe_gemv.DOWN_CONFIG.update(base_dn)
print("OK")
