"""GPU check of the absorbed MLA prefill kernel (kernels/mla/prefill.py) at the 48B shapes: H = 32,
latent 512 + rope 64 (D = 576), value_dim 512, bf16 cache, scale 192^-0.5, B = 1.

1. What the compiler made of each launch setting: registers, spills, shared memory, wgmma in the PTX.
2. Correctness on a smaller case (1000 queries after 0 and 3000 keys, B = 2) against float64 and beside
   the dense PyTorch form; the dispatcher and an on-device q_start give the same bits; an fp32 cache.
3. A chunk of 8192 queries after 0 and 131072 cached keys (and 1M with --long): query slices against
   float64, the same slices run alone against the whole chunk's rows (chunked prefill must agree), NaN
   rows past the last query; then time (do_bench median), FLOP rate and peak memory, beside the model's
   expanded path today (mla_prefill_sdpa) and, where its scores fit, the dense absorbed form.
4. A few launch settings timed at 2048 queries after 131072 keys.

Run from the repo root on the device:
    source packaging/source_shim.sh && python3 packaging/gpu_checks/mla_prefill.py [--long]
"""
import sys

import torch
import triton
import triton.testing

from kimi_desk.kernels.mla import mla_attention
from kimi_desk.kernels.mla.naive import mla_attention_dense, mla_attention_reference, mla_prefill_sdpa
from kimi_desk.kernels.mla.prefill import DEFAULT_CONFIG, mla_prefill_absorbed, mla_prefill_fwd_kernel
from kimi_desk.kernels.bench import _peak as peak_gib  # the benchmark's reader of peak GPU memory

assert torch.cuda.is_available(), "needs a CUDA GPU"
H, L, R, V = 32, 512, 64, 512
D = L + R
NOPE, VH = 128, 128  # the expanded path's per-head widths (qk_nope_head_dim, v_head_dim)
SCALE = 192**-0.5
dev = "cuda"
LONG = "--long" in sys.argv
torch.backends.cuda.matmul.allow_tf32 = False


def rel(a, b):
    assert not torch.isnan(a).any(), "NaN in the output"
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def inputs(B, Tq, q_start, seed, garbage=64):
    gen = torch.Generator(device=dev).manual_seed(seed)
    q = torch.randn(B, Tq, H, D, device=dev, generator=gen)
    cache = torch.randn(B, q_start + Tq + garbage, D, device=dev, generator=gen).bfloat16()
    cache[:, q_start + Tq :] = float("nan")  # a preallocated buffer's unfilled rows
    return q, cache


def flops(Tq, q_start):
    # Multiply-adds per (row, visible key): D for the score, V for the value; the causal triangle counted.
    return 2 * H * (D + V) * (Tq * q_start + Tq * (Tq + 1) // 2)


def bench_ms(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


_seen = set()


def compiled_report(label):
    """Registers, spills and shared memory of the kernels compiled since the last call (Triton 3.x keeps
    them in device_caches; 'n/a' where this version keeps them elsewhere)."""
    try:
        for cache in mla_prefill_fwd_kernel.device_caches.values():
            for key, k in cache[0].items():
                if id(k) in _seen:
                    continue
                _seen.add(id(k))
                ptx = k.asm.get("ptx", "")
                print(f"  compiled [{label}]: {k.n_regs} registers, {k.n_spills} spills, "
                      f"{k.metadata.shared / 1024:.0f} KB shared, wgmma in PTX: {'wgmma' in ptx}, "
                      f"warps {k.metadata.num_warps}, stages {k.metadata.num_stages}")
    except Exception as e:  # noqa: BLE001
        print(f"  compiled [{label}]: n/a ({type(e).__name__}: {e})")


print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
print(f"DEFAULT_CONFIG {DEFAULT_CONFIG}")

# 2. A smaller case: float64, the dense form, the dispatcher, q_start on the device.
for q_start in (0, 3000):
    B, Tq = 2, 1000
    q, cache = inputs(B, Tq, q_start, seed=q_start + 1)
    keys = cache[:, : q_start + Tq]
    want = mla_attention_reference(q.bfloat16().float(), keys, q_start, V, SCALE)
    ours = mla_prefill_absorbed(q, cache, q_start, V, SCALE)
    compiled_report("default")
    dense = mla_attention_dense(q, keys, q_start, V, SCALE)
    via_dispatch = mla_attention(q, cache, q_start, V, SCALE)
    on_device = mla_prefill_absorbed(q, cache, torch.tensor([q_start], device=dev), V, SCALE)
    e_ours, e_dense = rel(ours, want), rel(dense, want)
    print(f"small B={B} Tq={Tq} q_start={q_start}: rel err ours {e_ours:.2e}, dense {e_dense:.2e}, "
          f"ours vs dense {rel(ours, dense):.2e}; dispatch same bits {torch.equal(via_dispatch, ours)}, "
          f"device q_start same bits {torch.equal(on_device, ours)}")
    assert e_ours < 1e-2 and torch.equal(via_dispatch, ours) and torch.equal(on_device, ours)
    del q, cache, keys, want, ours, dense, via_dispatch, on_device
    torch.cuda.empty_cache()

# An fp32 cache (FP32_CONFIG, "ieee" dots): compiles, and lands near fp32.
q, cache = inputs(1, 100, 50, seed=5)
cache = cache.float()
want = mla_attention_reference(q, cache[:, :150], 50, V, SCALE)
e32 = rel(mla_prefill_absorbed(q, cache, 50, V, SCALE), want)
compiled_report("fp32")
print(f"fp32 cache Tq=100 q_start=50: rel err {e32:.2e}")
assert e32 < 1e-5
del q, cache, want

# 3. A prefill chunk at the real shapes.
rows = []
starts = [0, 131072] + ([1048576 - 8192] if LONG else [])
for q_start in starts:
    Tq = 8192
    q, cache = inputs(1, Tq, q_start, seed=7 + q_start)
    out = mla_prefill_absorbed(q, cache, q_start, V, SCALE)
    errs, agree = [], True
    # Slices of 4 queries (even starts: row blocks of 64 rows hold 2 queries, so a slice run alone has
    # the same row blocks and key blocks, hence the same bits).
    for i0 in (0, Tq // 2, Tq - 4):
        i1 = i0 + 4
        qs = q[:, i0:i1]
        want = mla_attention_reference(qs.bfloat16().float(), cache[:, : q_start + i1], q_start + i0, V, SCALE)
        errs.append(rel(out[:, i0:i1], want))
        alone = mla_prefill_absorbed(qs.contiguous(), cache, q_start + i0, V, SCALE)
        agree &= torch.equal(alone, out[:, i0:i1])
        del want, alone
    assert not torch.isnan(out).any() and max(errs) < 1e-2, errs
    torch.cuda.empty_cache()
    t = bench_ms(lambda: mla_prefill_absorbed(q, cache, q_start, V, SCALE))
    mem = peak_gib(lambda: mla_prefill_absorbed(q, cache, q_start, V, SCALE))
    row = dict(q_start=q_start, err=max(errs), agree=agree, ms=t, tflops=flops(Tq, q_start) / t / 1e9, gib=mem)

    # The model's path today: keys and values expanded from every cached latent, then SDPA.
    gen = torch.Generator(device=dev).manual_seed(3)
    qp = torch.randn(1, Tq, H, NOPE + R, device=dev, generator=gen).bfloat16()
    w_uk = (torch.randn(H, NOPE, L, device=dev, generator=gen) / L**0.5).bfloat16()
    w_uv = (torch.randn(H, VH, L, device=dev, generator=gen) / L**0.5).bfloat16()
    keys = cache[:, : q_start + Tq]
    try:
        row["sdpa_ms"] = bench_ms(lambda: mla_prefill_sdpa(qp, keys, w_uk, w_uv, q_start, SCALE))
        row["sdpa_gib"] = peak_gib(lambda: mla_prefill_sdpa(qp, keys, w_uk, w_uv, q_start, SCALE))
    except torch.OutOfMemoryError:
        row["sdpa_ms"] = row["sdpa_gib"] = float("nan")
    del qp, w_uk, w_uv
    torch.cuda.empty_cache()
    # The dense absorbed form, where its scores ([Tq * H, keys] fp32, and as many for the softmax) fit.
    row["dense_ms"] = row["dense_gib"] = float("nan")
    if Tq * H * keys.shape[1] * 4 * 3 < 40 * 2**30:
        row["dense_ms"] = bench_ms(lambda: mla_attention_dense(q, keys, q_start, V, SCALE))
        row["dense_gib"] = peak_gib(lambda: mla_attention_dense(q, keys, q_start, V, SCALE))
    rows.append(row)
    del q, cache, out, keys
    torch.cuda.empty_cache()

print(f"\nTq=8192, B=1, H=32, D=576, V=512, bf16 cache (memory: peak above the inputs)")
print(f"{'q_start':>8} {'rel err':>8} {'chunked':>7} {'ours ms':>9} {'TFLOP/s':>8} {'GiB':>6} "
      f"{'sdpa ms':>9} {'sdpa GiB':>8} {'dense ms':>9} {'dense GiB':>9}")
for r in rows:
    print(f"{r['q_start']:>8} {r['err']:8.1e} {str(r['agree']):>7} {r['ms']:9.2f} {r['tflops']:8.1f} {r['gib']:6.2f} "
          f"{r['sdpa_ms']:9.2f} {r['sdpa_gib']:8.2f} {r['dense_ms']:9.2f} {r['dense_gib']:9.2f}")

# 4. Launch settings at 2048 queries after 131072 keys.
configs = [
    DEFAULT_CONFIG,
    dict(block_m=64, block_n=64, block_v=None, num_warps=8, num_stages=2),
    dict(block_m=64, block_n=32, block_v=None, num_warps=8, num_stages=2),
    dict(block_m=64, block_n=16, block_v=None, num_warps=8, num_stages=4),
    dict(block_m=64, block_n=64, block_v=256, num_warps=8, num_stages=2),
    dict(block_m=128, block_n=64, block_v=128, num_warps=8, num_stages=2),
    # The two that compile for sm_90a without spills (packaging/gpu_checks/compile_sm90.py, no GPU needed):
    dict(block_m=32, block_n=32, block_v=None, num_warps=8, num_stages=3),
    dict(block_m=32, block_n=64, block_v=None, num_warps=8, num_stages=2),
]
Tq, q_start = 2048, 131072
q, cache = inputs(1, Tq, q_start, seed=11)
ref = mla_prefill_absorbed(q, cache, q_start, V, SCALE)
print(f"\nlaunch settings, Tq={Tq} q_start={q_start} (err: against DEFAULT_CONFIG)")
for cfg in configs:
    try:
        got = mla_prefill_absorbed(q, cache, q_start, V, SCALE, config=cfg)
        t = bench_ms(lambda: mla_prefill_absorbed(q, cache, q_start, V, SCALE, config=cfg))
        print(f"{cfg}: {t:8.2f} ms {flops(Tq, q_start) / t / 1e9:6.1f} TFLOP/s, err {rel(got, ref):.1e}")
        compiled_report(str(cfg))
    except Exception as e:  # a setting that does not compile (registers, shared memory) is reported
        print(f"{cfg}: {type(e).__name__}: {str(e)[:200]}")
print("OK")
