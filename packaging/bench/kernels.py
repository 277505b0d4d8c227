"""GPU check and benchmark of the Triton KDA kernels beside fla-core's, at the 48B model's shapes.

`main(argv)` (meant for `kimi-desk bench kernels`): on one CUDA GPU, with B = 1, H = 32, K = V = 128 and
bf16 inputs,
  1. checks our prefill and decode kernels, and fla's, against a float64 recurrence on the GPU, on fresh
     random inputs with the model's gate distribution and with extreme gates (log-decay down to -50 per
     step), outputs poisoned with NaN beforehand;
  2. times KDA prefill at T = 8k, 32k, 128k beside fla's `chunk_kda` on the same inputs and flags (peak
     memory too), after trying a few launch settings of each of our two kernels at 32k; then the layer's
     call on the raw projections: ours (engine/kda.py's), the prepass (kernels/kda/prepare.py) then the
     plain call, against fla's chunk_kda with the gate, the norms and beta's sigmoid in its kernels;
  2b. (part gates) the gate sweep: our prefill and fla's on every gate of GATE_SWEEP (issue 20's table,
     from -0.01 U(0, 1) to U(-50, 0)) and on the trained demo model's real gates tiled to these shapes,
     errors against float64 and times at each prefill length; the headline is the slowest ratio;
  3. times one KDA decode step at B = 1 and B = 8, alone and as 20 layer steps in a CUDA graph, beside
     fla's `fused_recurrent_kda` (the public call and the in-place serving call);
  4. (part mla) checks the Triton MLA decode kernel (kernels/mla/decode.py) and the PyTorch form
     `mla_attention_dense` against float64, tries a few launch settings, and times both at B = 1, H = 32,
     D = 576, value_dim = 512 with a bf16 cache of 8k, 128k and 1M tokens (one query; also 2, 4 and 16
     queries at 128k, and an fp8 cache at 1M), alone and as one call in a CUDA graph;
and reports time, ratio to fla (MLA: to the PyTorch form), and the fraction of the floor (bytes at the
measured copy bandwidth, FLOPs at the measured bf16 matmul rate). Prints a table last and writes JSON.
fla-core 0.6.0 is needed only here, as the reference for the KDA parts; nothing in kimi_desk imports it,
and the MLA part runs without it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

H, K, V = 32, 128, 128
LAYERS = 20
# MLA at the 48B shapes: 32 heads, latent 512 + rope 64, scale 192^-0.5.
MLA_H, MLA_D, MLA_V = 32, 576, 512
MLA_SCALE = 192**-0.5
MLA_LENGTHS = (8192, 131072, 1048576)
# Launch settings tried for one decode step (32 rows) at 1M, and for 4 and 16 queries (128 and 512 rows) at
# 128k; kernels/mla/decode.py's DEFAULT_CONFIG and WIDE_CONFIG are the first of each.
MLA_CONFIGS = [
    dict(block_m=32, block_n=64, num_warps=4, num_stages=2, waves=1),
    dict(block_m=32, block_n=64, num_warps=8, num_stages=2, waves=1),
    dict(block_m=32, block_n=32, num_warps=4, num_stages=3, waves=2),
]
MLA_WIDE_CONFIGS = [
    dict(block_m=64, block_n=32, num_warps=8, num_stages=3, waves=2),
    dict(block_m=64, block_n=32, num_warps=8, num_stages=3, waves=1),
    dict(block_m=64, block_n=32, num_warps=8, num_stages=2, waves=1),
    dict(block_m=64, block_n=64, num_warps=8, num_stages=2, waves=1),
    dict(block_m=32, block_n=64, num_warps=4, num_stages=2, waves=1),
]


def _gate_parameters(gen, device, heads=H, channels=K):
    """A_log [H] and dt_bias [H * K] of Kimi Linear's gate -exp(A_log) * softplus(x + dt_bias) at their
    initial values: A_log = log U(1, 16), dt_bias the inverse softplus of dt in [1e-3, 0.1] (log-uniform)."""
    import torch

    A_log = torch.log(torch.rand(heads, device=device, generator=gen) * 15 + 1)
    dt = torch.rand(heads * channels, device=device, generator=gen)
    dt = torch.exp(dt * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return A_log, dt + torch.log(-torch.expm1(-dt))


# The gate sweep: log decays per token and channel from the mildest to the most extreme (issue 20's
# table), plus the demo model's real gates where the caller can compute them ("demo-model").
GATE_SWEEP = ("mild", "model-init", "softplus(x-2)", "softplus(x)", "U(-10,0)", "half-8/-0.02", "U(-50,0)")


def sweep_gate(name, shape, gen, device="cpu"):
    """Log decay g [B, T, H, K] (fp32) from distribution `name` of GATE_SWEEP:
    mild           -0.01 U(0, 1)
    model-init     -exp(A_log) softplus(x + dt_bias), x ~ N(0, 1), A_log and dt_bias at their initial
                   values (_gate_parameters)
    softplus(x-2)  -exp(A_log) softplus(x - 2), A_log = log U(1, 16)
    softplus(x)    -exp(A_log) softplus(x) (mean about -6.6)
    U(-10,0), U(-50,0)  uniform per token and channel
    half-8/-0.02   every other channel -8, the rest -0.02."""
    import torch
    import torch.nn.functional as F

    B, T, Hh, Kk = shape
    if name == "mild":
        return -0.01 * torch.rand(shape, device=device, generator=gen)
    if name in ("model-init", "softplus(x-2)", "softplus(x)"):
        A_log, dt_bias = _gate_parameters(gen, device, Hh, Kk)
        x = torch.randn(shape, device=device, generator=gen)
        shift = dt_bias.view(Hh, Kk) if name == "model-init" else (-2.0 if name == "softplus(x-2)" else 0.0)
        return -A_log.exp()[:, None] * F.softplus(x + shift)
    if name.startswith("U("):
        low = float(name[2:].split(",")[0])
        return low * torch.rand(shape, device=device, generator=gen)
    if name == "half-8/-0.02":
        g = torch.full(shape, -0.02, device=device)
        g[..., ::2] = -8.0
        return g
    raise ValueError(f"unknown gate distribution {name!r}")


def tile_gates(gates, T, heads=H, channels=K):
    """Per-layer gates [T0, H0, K0] (the demo model's) -> one gate [1, T, heads, channels]: the layers'
    heads side by side, repeated over heads, channels and time."""
    import torch

    g = torch.cat(list(gates), dim=1)  # [T0, layers * H0, K0]
    T0, H0, K0 = g.shape
    g = g.repeat(-(-T // T0), -(-heads // H0), -(-channels // K0))
    return g[:T, :heads, :channels].unsqueeze(0).contiguous().float()


def kda_inputs(B, T, gate, seed, dtype=None, device="cuda"):
    import torch
    import torch.nn.functional as F

    dtype = dtype or torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, device=device, generator=gen), dim=-1).to(dtype)
    k = F.normalize(torch.randn(B, T, H, K, device=device, generator=gen), dim=-1).to(dtype)
    v = torch.randn(B, T, H, V, device=device, generator=gen).to(dtype)
    if gate == "model":
        A_log, dt_bias = _gate_parameters(gen, device)
        x = torch.randn(B, T, H, K, device=device, generator=gen)
        g = -A_log.exp()[:, None] * F.softplus(x + dt_bias.view(H, K))
    elif gate == "correlated":
        # Hard for the chunked form: keys nearly parallel within a head, beta near 1, slow decay, so that
        # (I + Akk)^-1 has large entries and U - W S cancels.
        base = torch.randn(1, 1, H, K, device=device, generator=gen)
        k = F.normalize(base + 0.05 * torch.randn(B, T, H, K, device=device, generator=gen), dim=-1).to(dtype)
        g = -0.01 * torch.rand(B, T, H, K, device=device, generator=gen)
    else:
        # Extreme: every channel anywhere in [-50, 0] per step.
        g = -50 * torch.rand(B, T, H, K, device=device, generator=gen)
    beta = torch.rand(B, T, H, device=device, generator=gen).sigmoid()
    if gate == "correlated":
        beta = 0.95 + 0.05 * beta
    h0 = torch.randn(B, H, K, V, device=device, generator=gen)
    return q, k, v, g.float(), beta.to(dtype), h0


def _raw_inputs(B, T, seed, device="cuda"):
    """The real layer's raw KDA inputs, as the prepass reads them: q, k before their L2 norm, the
    gate's input x with A_log and dt_bias (drawn as in kda_inputs), beta's logits; bf16 like the projections.
    Returns (q, k, v, x, beta_logits, A_log, dt_bias, h0) and the prepared (q, k, g, beta) in float64."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator(device=device).manual_seed(seed)
    bf = torch.bfloat16
    q = (2 * torch.randn(B, T, H, K, device=device, generator=gen)).to(bf)
    k = (0.5 * torch.randn(B, T, H, K, device=device, generator=gen)).to(bf)
    v = torch.randn(B, T, H, V, device=device, generator=gen).to(bf)
    A_log, dt_bias = _gate_parameters(gen, device)
    x = torch.randn(B, T, H, K, device=device, generator=gen).to(bf)
    beta_logits = torch.randn(B, T, H, device=device, generator=gen).to(bf)
    h0 = torch.randn(B, H, K, V, device=device, generator=gen)
    unit = lambda t: t.double() / (t.double().square().sum(-1, keepdim=True) + 1e-6).sqrt()  # noqa: E731
    g = -A_log.double().exp()[:, None] * F.softplus(x.double() + dt_bias.double().view(H, K))
    prepared = (unit(q), unit(k), g, beta_logits.double().sigmoid())
    return (q, k, v, x, beta_logits, A_log, dt_bias, h0), prepared


def _fla_fused(q, k, v, x, beta_logits, A_log, dt_bias, h0):
    """fla's chunk_kda on the raw inputs (_raw_inputs), the gate, q and k's L2 norm and beta's sigmoid in
    its kernels; from the state h0, returning the final state too."""
    from fla.ops.kda import chunk_kda

    return chunk_kda(
        q,
        k,
        v,
        x,
        beta_logits,
        initial_state=h0,
        output_final_state=True,
        use_gate_in_kernel=True,
        A_log=A_log,
        dt_bias=dt_bias,
        use_qk_l2norm_in_kernel=True,
        use_beta_sigmoid_in_kernel=True,
    )


def _reference_f64(q, k, v, g, beta, h0):
    """The token-by-token recurrence in float64 on the GPU."""
    import torch

    q, k, v, g, beta = (x.double() for x in (q, k, v, g, beta))
    q = q * K**-0.5
    S = h0.double().clone()
    o = torch.empty_like(v)
    for t in range(q.shape[1]):
        S = S * g[:, t].exp().unsqueeze(-1)
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, k[:, t]))
        S = S + k[:, t].unsqueeze(-1) * u.unsqueeze(-2)
        o[:, t] = torch.einsum("bhkv,bhk->bhv", S, q[:, t])
    return o, S


def _rel(a, b):
    """||a - b|| / ||b||; NaN whenever a holds a NaN or an inf, so that it can never pass."""
    import torch

    a, b = a.double(), b.double()
    if not bool(torch.isfinite(a).all()):
        return float("nan")
    return ((a - b).norm() / b.norm()).item()


def _accuracy(ours, fla, reference):
    """The relative errors of our (output, final state) and fla's against the float64 reference."""
    (o, s), (fo, fs), (o_ref, s_ref) = ours, fla, reference
    return dict(
        o_err=_rel(o, o_ref), state_err=_rel(s, s_ref), fla_o_err=_rel(fo, o_ref), fla_state_err=_rel(fs, s_ref)
    )


def _bench(fn, ms=200):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=ms, return_mode="median") * 1e3  # us


def _peak(fn):
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def _ceilings():
    import torch

    x = torch.empty(2**29, dtype=torch.float32, device="cuda").normal_()
    y = torch.empty_like(x)
    t = _bench(lambda: y.copy_(x))
    bw = 2 * x.numel() * 4 / (t * 1e-6)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = _bench(lambda: a @ b)
    flops = 2 * 8192**3 / (t * 1e-6)
    del x, y, a, b
    torch.cuda.empty_cache()
    return bw, flops


def check_correctness(log, intra_cfg=None, scan_cfg=None):
    """Rel. errors against float64 (and against fla) at real shapes; NaN-poisoned outputs."""
    import torch
    from fla.ops.kda import chunk_kda as fla_chunk
    from fla.ops.kda import fused_recurrent_kda as fla_recurrent

    from kimi_desk.kernels.kda.chunk import chunk_kda_triton
    from kimi_desk.kernels.kda.fused_recurrent import fused_recurrent_kda_triton
    from kimi_desk.kernels.kda.prepare import prepare_kda_triton

    rows = []

    def record(kernel, gate, B, T, ours, fla, reference):
        """One row of the report: our (output, final state) against float64 and against fla's; logged."""
        o, fo = ours[0], fla[0]
        accuracy = _accuracy(ours, fla, reference)
        rows.append(dict(kernel=kernel, gate=gate, B=B, T=T, **accuracy, vs_fla=_rel(o, fo), nan=bool(o.isnan().any())))
        log(rows[-1])

    for gate in ("model", "extreme", "correlated"):
        # A long odd length, then lengths under one chunk (a question after a document) and around its edge.
        # The long one first: fla autotunes on its first call and keeps that choice for every length, so a
        # first call at T = 18 would slow its prefill timings below by 40% (seen on an H100).
        for B, T in ((1, 2048 + 37), (2, 129), (1, 18), (1, 63), (1, 64), (1, 65)):
            q, k, v, g, beta, h0 = kda_inputs(B, T, gate, seed=T + B)
            reference = _reference_f64(q, k, v, g, beta, h0)
            out = torch.full((B, T, H, V), float("nan"), dtype=q.dtype, device="cuda")
            ours = chunk_kda_triton(
                q, k, v, g, beta, None, h0, True, out=out, intra_config=intra_cfg, scan_config=scan_cfg
            )
            fla = fla_chunk(q, k, v, g, beta, initial_state=h0, output_final_state=True)
            record("chunk", gate, B, T, ours, fla, reference)
        if gate == "model":
            # The layer's call on the raw projections: our prepass then the plain call (kernel "prepass"),
            # against fla's fused call.
            for B, T in ((1, 2048 + 37), (1, 18), (1, 65)):
                (q, k, v, x, bl, A_log, dt_bias, h0), (qn, kn, g, beta) = _raw_inputs(B, T, seed=T + 7)
                reference = _reference_f64(qn, kn, v, g, beta, h0)
                fla = _fla_fused(q, k, v, x, bl, A_log, dt_bias, h0)
                out = torch.full((B, T, H, V), float("nan"), dtype=q.dtype, device="cuda")
                prepared = prepare_kda_triton(q, k, x, A_log, dt_bias, bl)
                ours = chunk_kda_triton(*prepared[:2], v, *prepared[2:], None, h0, True, out=out)
                record("prepass", "raw", B, T, ours, fla, reference)
        for B, T in ((1, 1), (8, 1), (8, 5)):
            q, k, v, g, beta, h0 = kda_inputs(B, T, gate, seed=100 + T + B)
            reference = _reference_f64(q, k, v, g, beta, h0)
            out = torch.full((B, T, H, V), float("nan"), dtype=q.dtype, device="cuda")
            state = h0.clone()
            ours = fused_recurrent_kda_triton(q, k, v, g, beta, None, state, True, out=out, inplace_final_state=True)
            fla = fla_recurrent(q, k, v, g, beta, initial_state=h0, output_final_state=True)
            record("recurrent", gate, B, T, ours, fla, reference)
    return rows


def _plain_calls(q, k, v, g, beta, h0, intra_cfg, scan_cfg):
    """Our plain prefill call and fla's chunk_kda on the same inputs (initial and final state), each run
    once (fla autotunes on its first call); returns the two callables for timing."""
    from fla.ops.kda import chunk_kda as fla_chunk

    from kimi_desk.kernels.kda.chunk import chunk_kda_triton

    def ours():
        return chunk_kda_triton(q, k, v, g, beta, None, h0, True, intra_config=intra_cfg, scan_config=scan_cfg)

    def theirs():
        return fla_chunk(q, k, v, g, beta, initial_state=h0, output_final_state=True)

    ours()
    theirs()
    return ours, theirs


def gate_sweep(log, lengths, intra_cfg=None, scan_cfg=None, demo_gates=None, check_T=2048 + 37, device="cuda"):
    """Our prefill beside fla's chunk_kda on every gate of GATE_SWEEP, and on the demo model's gates tiled
    to the 48B shapes when `demo_gates` (a callable: device -> per-layer gates [T0, H0, K0]) is given:
    errors against float64 at T = check_T (outputs poisoned with NaN), then times at each length, with
    the same q, k, v, beta and initial state for every gate of one length. The headline is the slowest
    ratio fla time / our time over all gates and lengths."""
    import torch
    from fla.ops.kda import chunk_kda as fla_chunk

    from kimi_desk.kernels.kda.chunk import CHUNK_SIZE, SUB_CHUNK, chunk_kda_triton

    names, demo = list(GATE_SWEEP), None
    if demo_gates is not None:
        try:
            demo = demo_gates(device)
            names.append("demo-model")
        except Exception as e:  # the sweep of drawn gates still runs
            log(f"demo model gates: {type(e).__name__}: {str(e)[:300]}")
        if device == "cuda":
            torch.cuda.empty_cache()

    def gate(name, T, seed):
        if name == "demo-model":
            return tile_gates(demo, T, H, K)
        return sweep_gate(name, (1, T, H, K), torch.Generator(device=device).manual_seed(seed), device).float()

    res = dict(gates=names, check=[], timing=[])
    for name in names:
        q, k, v, _, beta, h0 = kda_inputs(1, check_T, "mild", seed=check_T, device=device)
        g = gate(name, check_T, seed=1)
        o_ref, s_ref = _reference_f64(q, k, v, g, beta, h0)
        out = torch.full((1, check_T, H, V), float("nan"), dtype=q.dtype, device=device)
        o, s = chunk_kda_triton(q, k, v, g, beta, None, h0, True, out=out, intra_config=intra_cfg, scan_config=scan_cfg)
        fo, fs = fla_chunk(q, k, v, g, beta, initial_state=h0, output_final_state=True)
        # The share of (16-token sub-chunk, head) pairs where some channel decays by more than 2^-120 over
        # the sub-chunk: the chunks the earlier kernel sent to its slower exact path (how steep the gate is).
        n = check_T // SUB_CHUNK * SUB_CHUNK
        steep = (g[:, :n].reshape(1, -1, SUB_CHUNK, H, K).sum(2).amin(-1) * 1.4426950408889634 < -120).float()
        row = dict(
            gate=name,
            T=check_T,
            **_accuracy((o, s), (fo, fs), (o_ref, s_ref)),
            nan=bool(o.isnan().any()),
            g_mean=g.mean().item(),
            g_q01=g.flatten()[: 2**24].quantile(0.01).item(),
            g_min=g.min().item(),
            steep_sub_chunks=steep.mean().item(),
        )
        res["check"].append(row)
        log(row)
        del q, k, v, g, beta, h0, o_ref, s_ref, out, o, s, fo, fs
    if device == "cuda":
        torch.cuda.empty_cache()
    assert CHUNK_SIZE % SUB_CHUNK == 0
    for T in lengths:
        q, k, v, _, beta, h0 = kda_inputs(1, T, "mild", seed=T, device=device)
        for name in names:
            g = gate(name, T, seed=T + 1)
            ours, theirs = _plain_calls(q, k, v, g, beta, h0, intra_cfg, scan_cfg)
            t_ours, t_fla = _bench(ours, ms=300), _bench(theirs, ms=300)
            res["timing"].append(dict(gate=name, T=T, ours_us=t_ours, fla_us=t_fla, speedup=t_fla / t_ours))
            log(res["timing"][-1])
            del g
        del q, k, v, beta, h0
        if device == "cuda":
            torch.cuda.empty_cache()
    if res["timing"]:
        worst = min(res["timing"], key=lambda r: r["speedup"])
        res["headline"] = dict(
            slowest_speedup=worst["speedup"],
            gate=worst["gate"],
            T=worst["T"],
            max_o_err=max(r["o_err"] for r in res["check"]),
            max_fla_o_err=max(r["fla_o_err"] for r in res["check"]),
        )
    return res


def tune_prefill(log, T=32768):
    """Time a few launch settings of each of our two prefill kernels; return the fastest of each."""
    import torch

    from kimi_desk.kernels.kda.chunk import chunk_kda_intra, chunk_kda_scan

    q, k, v, g, beta, h0 = kda_inputs(1, T, "model", seed=7)
    scale = K**-0.5
    # The default first (BK = 32; the in-sub-chunk blocks 4 rows a warp), then a wider channel block, more
    # warps, and the in-sub-chunk blocks' kernel 2 and 8 rows a warp.
    intra = [
        dict(BK=32, num_warps=4),
        dict(BK=64, num_warps=4),
        dict(BK=32, num_warps=8),
        dict(BK=64, num_warps=8),
        dict(BK=32, num_warps=4, diag_rows=2),
        dict(BK=32, num_warps=4, diag_rows=8),
    ]
    scan = [
        dict(BV=32, num_warps=4, num_stages=3),
        dict(BV=64, num_warps=4, num_stages=3),
        dict(BV=32, num_warps=8, num_stages=3),
    ]
    res = {"intra": [], "scan": []}
    for cfg in intra:
        try:
            log(f"intra {cfg}: registers, spills {chunk_kda_intra(q, k, v, g, beta, scale, **cfg)['compiled']}")
            t = _bench(lambda: chunk_kda_intra(q, k, v, g, beta, scale, **cfg))
        except Exception as e:  # a setting that does not compile (registers, shared memory) is skipped
            t = float("inf")
            log(f"intra {cfg}: {type(e).__name__}: {str(e)[:200]}")
        res["intra"].append(dict(cfg=cfg, us=t))
        log(f"intra {cfg}: {t:.0f} us")
    bufs = chunk_kda_intra(q, k, v, g, beta, scale)
    out = torch.empty(1, T, H, V, dtype=q.dtype, device="cuda")
    ht = torch.empty_like(h0)
    for cfg in scan:
        try:
            t = _bench(lambda: chunk_kda_scan(bufs, out, h0, ht, **cfg))
        except Exception as e:
            t = float("inf")
            log(f"scan {cfg}: {type(e).__name__}: {str(e)[:200]}")
        res["scan"].append(dict(cfg=cfg, us=t))
        log(f"scan {cfg}: {t:.0f} us")
    best_intra = min(res["intra"], key=lambda r: r["us"])["cfg"]
    best_scan = min(res["scan"], key=lambda r: r["us"])["cfg"]
    return best_intra, best_scan, res


def bench_prefill(log, lengths, intra_cfg, scan_cfg, matmul_flops, bandwidth):
    import torch

    from kimi_desk.kernels.kda.chunk import chunk_kda_triton
    from kimi_desk.kernels.kda.prepare import prepare_kda_triton

    rows = []
    for T in lengths:
        q, k, v, g, beta, h0 = kda_inputs(1, T, "model", seed=T)
        ours, theirs = _plain_calls(q, k, v, g, beta, h0, intra_cfg, scan_cfg)
        t_ours, t_fla = _bench(ours, ms=400), _bench(theirs, ms=400)
        mem_ours, mem_fla = _peak(ours), _peak(theirs)
        # Floor: inputs read once (q, k, v, beta bf16, g fp32), output written once; tech report eq. 13 FLOPs.
        bytes_ = T * H * (3 * K * 2 + K * 4 + 2 + V * 2) + 2 * H * K * V * 4
        flops = H * (6 * T * K * V + 3 * T * 64 * K + T * 64 * 64)
        floor_us = max(bytes_ / bandwidth, flops / matmul_flops) * 1e6
        del q, k, v, g, beta
        # The layer's call on the raw projections: our prepass then the plain call, against fla's fused call.
        (q, k, v, x, bl, A_log, dt_bias, h0), _ = _raw_inputs(1, T, seed=T)

        def prepass():
            return prepare_kda_triton(q, k, x, A_log, dt_bias, bl)

        def ours_prepass(intra_config=intra_cfg, scan_config=scan_cfg):
            qn, kn, g, beta = prepass()
            return chunk_kda_triton(
                qn, kn, v, g, beta, None, h0, True, intra_config=intra_config, scan_config=scan_config
            )

        def theirs_fused():
            return _fla_fused(q, k, v, x, bl, A_log, dt_bias, h0)

        ours_prepass()
        theirs_fused()
        t_prepass, t_fla_fused = _bench(ours_prepass, ms=400), _bench(theirs_fused, ms=400)
        t_prepass_alone = _bench(prepass, ms=200)
        # The tuned settings (intra_cfg, scan_cfg) are chosen on the plain call; the layer calls with the
        # defaults, so its call is timed at those too.
        t_prepass_default = t_prepass
        if intra_cfg is not None or scan_cfg is not None:
            t_prepass_default = _bench(lambda: ours_prepass(None, None), ms=400)
        # The prepass alone moves q, k, the gate input (bf16) and beta's logits in, unit q, k (bf16), g and
        # beta (fp32) out: its fraction of the copy bandwidth.
        prepass_bytes = T * H * (3 * K * 2 + 2 + 2 * K * 2 + K * 4 + 4)
        rows.append(
            dict(
                T=T,
                ours_us=t_ours,
                fla_us=t_fla,
                speedup=t_fla / t_ours,
                floor_us=floor_us,
                ours_frac_floor=floor_us / t_ours,
                fla_frac_floor=floor_us / t_fla,
                ours_peak_gib=mem_ours,
                fla_peak_gib=mem_fla,
                ours_mtok_s=T / t_ours,
                fla_mtok_s=T / t_fla,
                fused_fla_us=t_fla_fused,
                prepass_ours_us=t_prepass,
                prepass_speedup=t_fla_fused / t_prepass,
                prepass_kernel_us=t_prepass_alone,
                prepass_kernel_frac_bandwidth=prepass_bytes / bandwidth * 1e6 / t_prepass_alone,
                prepass_ours_default_us=t_prepass_default,
            )
        )
        log(rows[-1])
        del q, k, v, x, bl, h0
        torch.cuda.empty_cache()
    return rows


def bench_decode(log, bandwidth):
    import torch
    from fla.ops.kda import fused_recurrent_kda as fla_recurrent
    from fla.ops.kda.fused_recurrent import fused_recurrent_kda_fwd as fla_recurrent_fwd

    from kimi_desk.kernels.kda.fused_recurrent import fused_recurrent_kda_triton

    rows = []
    for B in (1, 8):
        layers = [kda_inputs(B, 1, "model", seed=1000 + i) for i in range(LAYERS)]
        states = [x[5].clone() for x in layers]
        outs = [torch.empty(B, 1, H, V, dtype=torch.bfloat16, device="cuda") for _ in range(LAYERS)]

        def ours(i):
            q, k, v, g, beta, _ = layers[i]
            fused_recurrent_kda_triton(q, k, v, g, beta, None, states[i], False, inplace_final_state=True, out=outs[i])

        def fla_inplace(i):
            q, k, v, g, beta, _ = layers[i]
            fla_recurrent_fwd(q, k, v, g, beta, initial_state=states[i], inplace_final_state=True, out=outs[i])

        def fla_public(i):
            q, k, v, g, beta, _ = layers[i]
            fla_recurrent(q, k, v, g, beta, initial_state=states[i], output_final_state=True)

        floor_us = (2 * B * H * K * V * 4 + B * H * (3 * K * 2 + K * 4 + 2 + V * 2)) / bandwidth * 1e6
        row = dict(B=B, floor_step_us=floor_us)
        for name, fn in (("ours", ours), ("fla_inplace", fla_inplace), ("fla_public", fla_public)):
            for i in range(LAYERS):
                fn(i)
            row[f"{name}_single_us"] = _bench(lambda: fn(0))
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for i in range(LAYERS):
                    fn(i)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for i in range(LAYERS):
                    fn(i)
            row[f"{name}_graph20_us"] = _bench(graph.replay)
            del graph
        row["speedup_graph20_vs_fla_public"] = row["fla_public_graph20_us"] / row["ours_graph20_us"]
        row["speedup_graph20_vs_fla_inplace"] = row["fla_inplace_graph20_us"] / row["ours_graph20_us"]
        row["ours_frac_floor_graph20"] = LAYERS * floor_us / row["ours_graph20_us"]
        rows.append(row)
        log(row)
    return rows


def tune_decode(log):
    """Graph of 20 in-place steps for a few tile widths and warp counts, at B = 1 and B = 8."""
    import torch

    from kimi_desk.kernels.kda.fused_recurrent import fused_recurrent_kda_triton

    res = []
    for B in (1, 8):
        layers = [kda_inputs(B, 1, "model", seed=1000 + i) for i in range(LAYERS)]
        states = [x[5].clone() for x in layers]
        outs = [torch.empty(B, 1, H, V, dtype=torch.bfloat16, device="cuda") for _ in range(LAYERS)]
        for bv, nw in ((16, 4), (32, 2), (64, 2), (64, 4)):

            def step(i):
                q, k, v, g, beta, _ = layers[i]
                fused_recurrent_kda_triton(
                    q,
                    k,
                    v,
                    g,
                    beta,
                    None,
                    states[i],
                    False,
                    inplace_final_state=True,
                    out=outs[i],
                    block_v=bv,
                    num_warps=nw,
                )

            for i in range(LAYERS):
                step(i)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for i in range(LAYERS):
                    step(i)
            res.append(dict(B=B, BV=bv, num_warps=nw, graph20_us=_bench(graph.replay)))
            log(res[-1])
    return res


def _mla_inputs(Tk, Tq, seed, dtype=None):
    """Absorbed queries (fp32, as the model passes them) and a cache of unit-variance values (the scale of
    an RMS-normalised latent)."""
    import torch

    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, Tq, MLA_H, MLA_D, device="cuda", generator=gen)
    cache = torch.randn(1, Tk, MLA_D, device="cuda", generator=gen).to(dtype or torch.bfloat16)
    return q, cache


def _fp8_per_token(cache):
    """cache [B, Tk, D] -> (e4m3 cache, [B, Tk] float32 scales), each token scaled to the e4m3 range."""
    import torch

    scale = cache.float().abs().amax(-1).clamp_min(1e-12) / 448.0
    return (cache.float() / scale[..., None]).to(torch.float8_e4m3fn), scale


def check_mla(log):
    """Rel. error of the Triton kernel, the dispatcher and the PyTorch form against float64, on odd
    lengths and several query counts; outputs poisoned with NaN."""
    import torch

    from kimi_desk.kernels.mla import mla_attention
    from kimi_desk.kernels.mla.decode import mla_decode
    from kimi_desk.kernels.mla.naive import mla_attention_reference
    from kimi_desk.kernels.mla.torch_attention import mla_attention_dense

    rows = []
    for Tk, Tq, q_start in (
        (1, 1, 0),
        (8192 + 37, 1, 8192 + 36),
        (131072 + 5, 4, 131072 + 1),
        (131072 + 5, 16, 100_000),
        (1048576, 1, 1048575),
    ):
        q, cache = _mla_inputs(Tk, Tq, seed=Tk + Tq)
        ref = mla_attention_reference(q.bfloat16().float(), cache, q_start, MLA_V, MLA_SCALE)
        out = torch.full((1, Tq, MLA_H, MLA_V), float("nan"), device="cuda")
        ours = mla_decode(q, cache, q_start, MLA_V, MLA_SCALE, out=out)
        row = dict(
            Tk=Tk,
            Tq=Tq,
            q_start=q_start,
            ours_err=_rel(ours, ref),
            dispatch_err=_rel(mla_attention(q, cache, q_start, MLA_V, MLA_SCALE), ref),
            dense_err=_rel(mla_attention_dense(q, cache, q_start, MLA_V, MLA_SCALE), ref),
            nan=bool(ours.isnan().any()),
        )
        if Tk == 1048576:
            # The optional fp8 cache, one scale per token: against float64 on the dequantised cache, and
            # against the bf16 cache's reference (the quantisation error).
            try:
                c8, s8 = _fp8_per_token(cache)
                ref8 = mla_attention_reference(
                    q.bfloat16().float(), c8.float() * s8[..., None], q_start, MLA_V, MLA_SCALE
                )
                out8 = mla_decode(q, c8, q_start, MLA_V, MLA_SCALE, k_scale=s8)
                row.update(fp8_err=_rel(out8, ref8), fp8_vs_bf16_ref=_rel(out8, ref))
                del c8, s8, ref8, out8
            except Exception as e:  # the optional fp8 path must not hide the bf16 results
                row["fp8_err"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        log(row)
        del q, cache, ref
        torch.cuda.empty_cache()
    return rows


def _graph_us(fn):
    """Median time of one call captured in a CUDA graph: the GPU's time without the host's launches."""
    import torch

    fn()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    t = _bench(graph.replay)
    del graph
    return t


def bench_mla(log, bandwidth):
    """Time the Triton MLA decode beside the PyTorch form on the same inputs. The launch settings in
    MLA_CONFIGS are tried for one query at 1M and those in MLA_WIDE_CONFIGS for 4 and 16 queries at
    128k; every case is then timed (alone, and as one call in a CUDA graph) and checked against float64
    with the fastest."""
    import torch

    from kimi_desk.kernels.mla.decode import mla_decode
    from kimi_desk.kernels.mla.naive import mla_attention_reference
    from kimi_desk.kernels.mla.torch_attention import mla_attention_dense

    def floor_us(Tk, Tq, elem_bytes=2):
        # The cache read once, q read once, the output written once.
        return (Tk * MLA_D * elem_bytes + Tq * MLA_H * (MLA_D * 4 + MLA_V * 4)) / bandwidth * 1e6

    res = dict(tuning=[], rows=[])
    for Tk, Tq, configs in ((1048576, 1, MLA_CONFIGS), (131072, 4, MLA_WIDE_CONFIGS), (131072, 16, MLA_WIDE_CONFIGS)):
        q, cache = _mla_inputs(Tk, Tq, seed=Tk + Tq)
        for cfg in configs:
            try:
                t = _bench(lambda: mla_decode(q, cache, Tk - Tq, MLA_V, MLA_SCALE, config=cfg))
            except Exception as e:  # a setting that does not fit (shared memory) is skipped
                t = float("inf")
                log(f"mla {cfg}: {type(e).__name__}: {str(e)[:200]}")
            res["tuning"].append(dict(Tk=Tk, Tq=Tq, cfg=cfg, us=t, frac_floor=floor_us(Tk, Tq) / t))
            log(res["tuning"][-1])
        del q, cache
        torch.cuda.empty_cache()
    best = min((r for r in res["tuning"] if r["Tq"] == 1), key=lambda r: r["us"])["cfg"]
    wide = {}
    for r in res["tuning"]:
        if r["Tq"] > 1:
            wide.setdefault(str(r["cfg"]), [r["cfg"], 0.0])[1] += r["us"]
    best_wide = min(wide.values(), key=lambda x: x[1])[0]
    res["chosen"] = dict(one_query=best, several_queries=best_wide)

    cases = [(Tk, 1) for Tk in MLA_LENGTHS] + [(131072, 2), (131072, 4), (131072, 16)]
    for Tk, Tq in cases:
        q, cache = _mla_inputs(Tk, Tq, seed=Tk + 3 * Tq)
        q_start = Tk - Tq
        cfg = best if Tq * MLA_H <= 32 else best_wide
        row = dict(Tk=Tk, Tq=Tq, cfg=cfg, floor_us=floor_us(Tk, Tq))

        def ours():
            return mla_decode(q, cache, q_start, MLA_V, MLA_SCALE, config=cfg)

        def dense():
            return mla_attention_dense(q, cache, q_start, MLA_V, MLA_SCALE)

        out = torch.full((1, Tq, MLA_H, MLA_V), float("nan"), device="cuda")
        ref = mla_attention_reference(q.bfloat16().float(), cache, q_start, MLA_V, MLA_SCALE)
        row["ours_err"] = _rel(mla_decode(q, cache, q_start, MLA_V, MLA_SCALE, out=out, config=cfg), ref)
        row["dense_err"] = _rel(dense(), ref)
        del ref, out
        torch.cuda.empty_cache()
        row["ours_us"] = _bench(ours)
        row["dense_us"] = _bench(dense)
        try:
            row["ours_graph_us"] = _graph_us(ours)
            row["dense_graph_us"] = _graph_us(dense)
        except Exception as e:  # graph timings are extra information
            log(f"mla graph: {type(e).__name__}: {str(e)[:200]}")
        row["speedup"] = row["dense_us"] / row["ours_us"]
        row["ours_frac_floor"] = row["floor_us"] / row["ours_us"]
        row["dense_frac_floor"] = row["floor_us"] / row["dense_us"]
        row["ours_peak_gib"] = _peak(ours)
        row["dense_peak_gib"] = _peak(dense)
        if Tk == 1048576 and Tq == 1:
            try:
                c8, s8 = _fp8_per_token(cache)
                row["fp8_us"] = _bench(lambda: mla_decode(q, c8, q_start, MLA_V, MLA_SCALE, k_scale=s8, config=cfg))
                row["fp8_frac_floor"] = floor_us(Tk, 1, elem_bytes=1) / row["fp8_us"]
                del c8, s8
            except Exception as e:
                log(f"mla fp8: {type(e).__name__}: {str(e)[:200]}")
        res["rows"].append(row)
        log(row)
        del q, cache
        torch.cuda.empty_cache()
    return res


def main(argv=None, demo_gates=None):
    """`demo_gates` (device -> the demo model's per-layer gates, packaging/bench/model.py) adds the trained
    model's gates to the gate sweep; the kernels layer does not load models itself."""
    ap = argparse.ArgumentParser(prog="kimi-desk bench kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None, help="where to write the results (default .bench/kernels-DATE.json)")
    ap.add_argument("--lengths", default="8192,32768,131072", help="prefill lengths, comma-separated")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: check,tune,prefill,gates,decode,mla")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("kimi-desk bench kernels needs a CUDA GPU", file=sys.stderr)
        return 2
    skip = set(filter(None, args.skip.split(",")))
    # fla is the reference of the KDA parts only.
    fla = None
    if not {"check", "tune", "prefill", "gates", "decode"} <= skip:
        try:
            import fla
        except ImportError:
            print(
                "the KDA parts compare with fla-core 0.6.0: pip install fla-core==0.6.0 "
                "(or --skip check,tune,prefill,decode for the MLA part alone)",
                file=sys.stderr,
            )
            return 2
    import triton

    log = lambda x: print(x, flush=True)  # noqa: E731
    res = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        card=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        fla=getattr(fla, "__version__", None),
        shapes=dict(H=H, K=K, V=V, dtype="bfloat16"),
    )
    bw, mm = _ceilings()
    res.update(copy_bandwidth_Bps=bw, bf16_matmul_flops=mm)
    log(f"{res['card']}: copy {bw / 1e12:.2f} TB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s")
    intra_cfg, scan_cfg = None, None
    if "tune" not in skip:
        intra_cfg, scan_cfg, res["tuning"] = tune_prefill(log)
        res["chosen"] = dict(intra=intra_cfg, scan=scan_cfg)
        res["tuning_decode"] = tune_decode(log)
    if "check" not in skip:
        res["correctness"] = check_correctness(log, intra_cfg, scan_cfg)
    if "prefill" not in skip:
        lengths = [int(x) for x in args.lengths.split(",")]
        res["prefill"] = bench_prefill(log, lengths, intra_cfg, scan_cfg, mm, bw)
    if "gates" not in skip:
        res["gate_sweep"] = gate_sweep(log, [int(x) for x in args.lengths.split(",")], intra_cfg, scan_cfg, demo_gates)
        res["gate_sweep"]["settings"] = dict(intra=intra_cfg, scan=scan_cfg)
    if "decode" not in skip:
        res["decode"] = bench_decode(log, bw)
    if "mla" not in skip:
        res["mla_shapes"] = dict(B=1, H=MLA_H, D=MLA_D, value_dim=MLA_V, cache="bfloat16", q="float32")
        res["mla_correctness"] = check_mla(log)
        res["mla"] = bench_mla(log, bw)

    path = args.json or os.path.join(".bench", f"kernels-{res['date'][:10]}.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)

    if "chosen" in res:
        print(f"\nchosen prefill settings: {res['chosen']}")
    print(f"\n{res['card']}  {res['date']}  torch {res['torch']}  triton {res['triton']}  fla {res['fla']}")
    for r in res.get("correctness", []):
        print(
            f"check {r['kernel']:9s} {r['gate']:7s} B={r['B']} T={r['T']:5d}: rel err o {r['o_err']:.1e} "
            f"state {r['state_err']:.1e} (fla {r['fla_o_err']:.1e} / {r['fla_state_err']:.1e}) nan={r['nan']}"
        )
    for r in res.get("prefill", []):
        print(
            f"prefill T={r['T']:6d}: ours {r['ours_us'] / 1e3:7.2f} ms  fla {r['fla_us'] / 1e3:7.2f} ms  "
            f"x{r['speedup']:.2f}  floor {r['ours_frac_floor']:.0%}  peak {r['ours_peak_gib']:.1f} / "
            f"{r['fla_peak_gib']:.1f} GiB;  on raw projections: ours (prepass + plain) "
            f"{r['prepass_ours_us'] / 1e3:.2f} ms  fla fused {r['fused_fla_us'] / 1e3:.2f} ms  "
            f"x{r['prepass_speedup']:.2f} (prepass alone {r['prepass_kernel_us'] / 1e3:.2f} ms, "
            f"{r['prepass_kernel_frac_bandwidth']:.0%} of copy bandwidth); at the default settings (the "
            f"layer's) {r['prepass_ours_default_us'] / 1e3:.2f} ms"
        )
    sweep = res.get("gate_sweep")
    if sweep:
        for r in sweep["check"]:
            print(
                f"gate {r['gate']:13s} T={r['T']}: rel err o {r['o_err']:.2e} state {r['state_err']:.2e} "
                f"(fla {r['fla_o_err']:.2e} / {r['fla_state_err']:.2e}) nan={r['nan']}  g mean {r['g_mean']:.2f} "
                f"1% {r['g_q01']:.2f} min {r['g_min']:.1f}  steep sub-chunks {r['steep_sub_chunks']:.0%}"
            )
        for r in sweep["timing"]:
            print(
                f"gate {r['gate']:13s} T={r['T']:6d}: ours {r['ours_us'] / 1e3:7.2f} ms  "
                f"fla {r['fla_us'] / 1e3:7.2f} ms  x{r['speedup']:.2f}"
            )
        if "headline" in sweep:
            h = sweep["headline"]
            print(
                f"gate sweep headline: slowest fla/ours x{h['slowest_speedup']:.2f} ({h['gate']}, T={h['T']}); "
                f"max rel err of o against float64: ours {h['max_o_err']:.2e}, fla {h['max_fla_o_err']:.2e}"
            )
    for r in res.get("decode", []):
        print(
            f"decode B={r['B']}: 1 step ours {r['ours_single_us']:.1f} us fla {r['fla_public_single_us']:.1f} us; "
            f"20 in a graph ours {r['ours_graph20_us']:.1f} us fla {r['fla_public_graph20_us']:.1f} us "
            f"(in-place {r['fla_inplace_graph20_us']:.1f}) x{r['speedup_graph20_vs_fla_public']:.2f}  "
            f"floor {r['ours_frac_floor_graph20']:.0%}"
        )
    for r in res.get("mla_correctness", []):
        fp8 = r.get("fp8_err")
        fp8 = f" fp8 {fp8:.1e}" if isinstance(fp8, float) else (f" fp8 {fp8}" if fp8 else "")
        print(
            f"check mla Tk={r['Tk']:7d} Tq={r['Tq']:2d}: rel err ours {r['ours_err']:.1e} dispatch "
            f"{r['dispatch_err']:.1e} dense {r['dense_err']:.1e}{fp8} nan={r['nan']}"
        )
    if "mla" in res:
        print(f"mla chosen settings: {res['mla']['chosen']}")
        for r in res["mla"]["rows"]:
            extra = ""
            if "ours_graph_us" in r:
                extra += f"  in a graph {r['ours_graph_us']:.1f} / {r['dense_graph_us']:.1f} us"
            if "fp8_us" in r:
                extra += f"  fp8 {r['fp8_us']:.1f} us ({r['fp8_frac_floor']:.0%} of its floor)"
            print(
                f"mla Tk={r['Tk']:7d} Tq={r['Tq']:2d}: ours {r['ours_us']:8.1f} us  dense {r['dense_us']:8.1f} us  "
                f"x{r['speedup']:.2f}  floor {r['floor_us']:.1f} us = ours {r['ours_frac_floor']:.0%} / dense "
                f"{r['dense_frac_floor']:.0%}  err {r['ours_err']:.1e} / {r['dense_err']:.1e}  "
                f"peak {r['ours_peak_gib']:.2f} / {r['dense_peak_gib']:.2f} GiB{extra}"
            )
    print(f"json: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
