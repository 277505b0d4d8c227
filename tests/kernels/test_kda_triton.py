"""The Triton KDA kernels, run on CPU tensors through Triton's interpreter, against a float64 recurrence
and fla-core's naive recurrence.

The entry points are called directly: the dispatcher sends CPU tensors to PyTorch. TRITON_INTERPRET is
set by tests/conftest.py before anything imports Triton; it is set here too for a lone run of this file.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")
from fla.ops.kda.naive import naive_recurrent_kda  # noqa: E402
from kda_cases import make_inputs, reference_f64, rel_err  # noqa: E402

from kimi_desk.bench.kernels import GATE_SWEEP, sweep_gate  # noqa: E402
from kimi_desk.kernels.kda.chunk import SUB_CHUNK, chunk_kda_diag_blocks, chunk_kda_triton  # noqa: E402
from kimi_desk.kernels.kda.fused_recurrent import fused_recurrent_kda_triton  # noqa: E402
from kimi_desk.kernels.kda.naive import chunk_kda_torch  # noqa: E402

# Relative error against float64, per dtype of the inputs. bf16: the inputs are the same bf16 values in
# both; the error is the bf16 output and the bf16 scratch between the two prefill kernels (fla's choice
# too; on the H100 ours and fla's measured 3e-3 to 1e-2 at the 48B shapes). fp32: cumulative gates in fp32.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


SIZES = [
    (1, 1, 2, 16, 16, -5.0),
    (2, 63, 2, 32, 16, -1.0),
    (1, 65, 1, 64, 32, -50.0),
    (1, 200, 2, 32, 32, -50.0),
    (1, 130, 1, 16, 64, -0.05),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,T,H,K,V,min_log_decay", SIZES, ids=lambda x: str(x))
def test_chunk_matches_float64(dtype, B, T, H, K, V, min_log_decay):
    q, k, v, g, beta, state = make_inputs(B, T, H, K, V, min_log_decay, dtype, seed=T * 7 + K)
    beta = beta.to(dtype)
    o_ref, s_ref = reference_f64(q, k, v, g, beta, state)
    out = torch.full((B, T, H, V), float("nan"), dtype=dtype)
    o, s = chunk_kda_triton(q, k, v, g, beta, None, state, True, out=out)
    assert o is out and o.dtype == dtype
    assert rel_err(o, o_ref) < TOLERANCE[dtype]
    assert rel_err(s, s_ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("gate", GATE_SWEEP)
def test_chunk_every_gate_distribution(gate, dtype):
    """Every gate of the benchmark's sweep, from -0.01 U(0, 1) to U(-50, 0) per token and channel, against
    float64 and as close to it as the PyTorch chunked form beside the kernel (float64 cumulative gates)."""
    B, T, H, K, V = 1, 130, 2, 64, 16
    q, k, v, _, beta, state = make_inputs(B, T, H, K, V, -1.0, dtype, seed=17)
    beta = beta.to(dtype)
    g = sweep_gate(gate, (B, T, H, K), torch.Generator().manual_seed(len(gate)))
    o_ref, s_ref = reference_f64(q, k, v, g, beta, state)
    out = torch.full((B, T, H, V), float("nan"), dtype=dtype)
    o, s = chunk_kda_triton(q, k, v, g, beta, None, state, True, out=out)
    o_err, s_err = rel_err(o, o_ref), rel_err(s, s_ref)
    assert o_err < TOLERANCE[dtype] and s_err < TOLERANCE[dtype]
    if dtype == torch.float32:
        o_torch, s_torch = chunk_kda_torch(q, k, v, g, beta, None, state, True)
        assert o_err < 2 * rel_err(o_torch, o_ref) + 1e-6 and s_err < 2 * rel_err(s_torch, s_ref) + 1e-6


@pytest.mark.parametrize(
    "config",
    [
        dict(BK=32),
        dict(BK=64),
        dict(BK=16),
        dict(BK=32, diag_rows=16, diag_warps=4),
        dict(BK=64, diag_rows=2),
        dict(BK=32, diag_rows=8, diag_warps=2),
    ],
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()),
)
@pytest.mark.parametrize("gate", ["mild", "U(-50,0)"])
def test_chunk_launch_settings(config, gate):
    """The launch settings the benchmark tries compute the same function: channel blocks of 16 to 64,
    blocks of 2 to 16 rows for the pairs inside the sub-chunks; no initial state and a scale that is not
    the default."""
    q, k, v, _, beta, _ = make_inputs(1, 100, 2, 64, 32, -0.5, torch.float32, seed=5)
    g = sweep_gate(gate, (1, 100, 2, 64), torch.Generator().manual_seed(6))
    o_ref, s_ref = reference_f64(q, k, v, g, beta, None, scale=0.3)
    o, s = chunk_kda_triton(q, k, v, g, beta, 0.3, None, True, intra_config=config)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


def diag_blocks_f64(q, k, g, beta, scale):
    """Aqk's and Akk's diagonal [SUB_CHUNK, SUB_CHUNK] blocks in float64, [B, T, H, SUB_CHUNK] each (zeros
    above the diagonal), and for each entry the bound on an fp32 computation's error that follows from
    its own pair's decays: unit roundoff times sum_d |q_id k_jd| exp(G_id - G_jd) (K + 16 (1 + |G_id - G_jd|))
    (the dot's K roundings, a sum of at most 15 gates and the exponential), scaled as the entry is."""
    B, T, H, K = q.shape
    BC = SUB_CHUNK
    n = -(-T // BC) * BC
    pad = lambda x: F.pad(x.double(), (0, 0) * (x.dim() - 2) + (0, n - T)).unflatten(1, (n // BC, BC))  # noqa: E731
    qs, ks, gs, bs = pad(q), pad(k), pad(g), pad(beta[..., None])[..., 0]  # [B, N, BC, H, (K)]
    G = gs.cumsum(2)
    dG = G[:, :, :, None] - G[:, :, None, :]  # [B, N, i, j, H, K]
    o = torch.arange(BC)
    on_or_below, below = (o[:, None] >= o[None, :]), (o[:, None] > o[None, :])
    decay = torch.where(on_or_below[None, None, :, :, None, None], dG, -torch.inf).exp()
    qk = qs[:, :, :, None] * ks[:, :, None, :]
    kk = ks[:, :, :, None] * ks[:, :, None, :]
    weight = decay * (K + 16 * (1 + dG.abs().nan_to_num(posinf=0.0))) * 2.0**-24
    aqk = scale * (qk * decay).sum(-1)
    akk = bs[:, :, :, None, :] * torch.where(below[None, None, :, :, None], (kk * decay).sum(-1), 0.0)
    aqk_bound = scale * (qk.abs() * weight).sum(-1)
    akk_bound = bs[:, :, :, None, :] * torch.where(below[None, None, :, :, None], (kk.abs() * weight).sum(-1), 0.0)
    # [B, N, i, j, H] -> [B, T, H, j]
    out = lambda x: x.permute(0, 1, 2, 4, 3).flatten(1, 2)[:, :T]  # noqa: E731
    return out(aqk), out(akk), out(aqk_bound), out(akk_bound)


def extreme_gate(shape, gen):
    """Per-token log decays in [-50, 0] in half the channels, -0.02 in the rest, and in one token a drop of
    -1000 in a quarter of the channels: small decays beside large ones in every sub-chunk."""
    g = -50 * torch.rand(shape, generator=gen)
    g[..., 1::2] = -0.02
    g[:, shape[1] // 3, :, : shape[-1] // 4] = -1000.0
    return g


@pytest.mark.parametrize(
    "rows,gate,dtype",
    [(4, gate, dtype) for gate in ("mild", "half-8/-0.02", "U(-50,0)", "extreme") for dtype in ("fp32", "bf16")]
    + [(1, "extreme", "fp32"), (16, "U(-50,0)", "bf16")],
)
def test_diag_blocks_kernel_matches_float64(rows, gate, dtype):
    """The kernel of the pairs inside the sub-chunks alone, on blocks of 4 rows (the default), 1 and 16:
    every entry within the fp32 error that its own pair's decays allow (a large decay elsewhere in the
    sub-chunk costs it no precision: the difference of the sub-chunk's fp32 cumulative sums exceeds this
    bound 2 to 6 times on the last two gates, this kernel stays under an eighth of it), exact zeros above
    the diagonal, no NaN. A tail sub-chunk (T = 37), two sequences, channels not a power of two."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    B, T, H, K = 2, 37, 2, 48
    gen = torch.Generator().manual_seed(rows * 100 + len(gate))
    q, k, _, _, beta, _ = make_inputs(B, T, H, K, 1, -1.0, dtype, seed=rows + len(gate))
    beta = beta.to(dtype)
    g = extreme_gate((B, T, H, K), gen) if gate == "extreme" else sweep_gate(gate, (B, T, H, K), gen)
    aqk_ref, akk_ref, aqk_bound, akk_bound = diag_blocks_f64(q, k, g, beta, 0.3)
    aqk, akk, _ = chunk_kda_diag_blocks(q, k, g, beta, 0.3, rows=rows)
    assert aqk.shape == akk.shape == (B, T, H, SUB_CHUNK) and aqk.dtype == akk.dtype == torch.float32
    assert not aqk.isnan().any() and not akk.isnan().any()
    upper = torch.arange(SUB_CHUNK)[None, :] > (torch.arange(T) % SUB_CHUNK)[:, None]  # [T, j]
    assert (aqk[:, upper.nonzero()[:, 0], :, upper.nonzero()[:, 1]] == 0).all()
    assert (aqk - aqk_ref).abs().le(aqk_bound + 1e-30).all()
    assert (akk - akk_ref).abs().le(akk_bound + 1e-30).all()


def test_chunk_one_token_decays_past_everything():
    """Within one sub-chunk, half the channels drop by e^-1000 at one token while the others barely move
    (and one decays by e^-60 a token after it): no NaN, and the pairs on either side of the drop keep their
    decays. The error left is that of exp(sum after token j) for j the dropping token itself, whose own
    gate is subtracted from a sum holding it: 1000 * 2^-24 relative in those entries (the float64 sums of
    the PyTorch chunked form, 1.4e-6 on o here)."""
    q, k, v, g, beta, state = make_inputs(1, 64, 1, 16, 16, -0.01, torch.float32, seed=12)
    g[0, 21, 0, :8] = -1000.0
    g[0, 22:, 0, 8] = -60.0
    o_ref, s_ref = reference_f64(q, k, v, g, beta, state)
    o, s = chunk_kda_triton(q, k, v, g, beta, None, state, True)
    assert rel_err(o, o_ref) < 2e-5 and rel_err(s, s_ref) < 5e-5


def test_chunk_gate_beyond_fp32_exponent():
    """One token whose log-decay alone is -200 (exp underflows fp32) amid gentle ones: still exact, no NaN,
    and the state before it is forgotten in exactly that channel."""
    q, k, v, g, beta, state = make_inputs(1, 80, 1, 16, 16, -0.1, torch.float32, seed=11)
    g[0, 40, 0, 3] = -200.0
    g[0, 41:, 0, 5] = -90.0
    o_ref, s_ref = reference_f64(q, k, v, g, beta, state)
    o, s = chunk_kda_triton(q, k, v, g, beta, None, state, True)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


def test_chunk_matches_fla_naive_without_state():
    q, k, v, g, beta, _ = make_inputs(2, 70, 2, 32, 16, -3.0, torch.float32, seed=3)
    o_fla, s_fla = naive_recurrent_kda(q, k, v, g, beta, output_final_state=True)
    o, s = chunk_kda_triton(q, k, v, g, beta, output_final_state=True)
    assert rel_err(o, o_fla) < 1e-5 and rel_err(s, s_fla) < 1e-5
    o2, s2 = chunk_kda_triton(q, k, v, g, beta)
    assert s2 is None and torch.equal(o2, o)


def test_chunk_continues_from_its_own_state():
    """Prefill in two pieces (split off a chunk boundary) == prefill in one."""
    q, k, v, g, beta, state = make_inputs(1, 150, 1, 32, 32, -2.0, torch.float32, seed=4)
    o, s = chunk_kda_triton(q, k, v, g, beta, None, state, True)
    o1, s1 = chunk_kda_triton(q[:, :77], k[:, :77], v[:, :77], g[:, :77], beta[:, :77], None, state, True)
    o2, s2 = chunk_kda_triton(q[:, 77:], k[:, 77:], v[:, 77:], g[:, 77:], beta[:, 77:], None, s1, True)
    assert rel_err(torch.cat([o1, o2], 1), o) < 1e-5 and rel_err(s2, s) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "B,T,H,K,V,min_log_decay",
    [(1, 1, 2, 16, 16, -5.0), (3, 5, 2, 32, 48, -50.0), (1, 63, 1, 64, 16, -1.0)],
    ids=lambda x: str(x),
)
def test_recurrent_matches_float64(dtype, B, T, H, K, V, min_log_decay):
    q, k, v, g, beta, state = make_inputs(B, T, H, K, V, min_log_decay, dtype, seed=T * 3 + K)
    beta = beta.to(dtype)
    o_ref, s_ref = reference_f64(q, k, v, g, beta, state)
    out = torch.full((B, T, H, V), float("nan"), dtype=dtype)
    o, s = fused_recurrent_kda_triton(q, k, v, g, beta, None, state, True, out=out)
    assert rel_err(o, o_ref) < TOLERANCE[dtype]
    assert rel_err(s, s_ref) < TOLERANCE[dtype]
    o_fla, s_fla = naive_recurrent_kda(q, k, v, g, beta, initial_state=state, output_final_state=True)
    assert rel_err(s, s_fla) < TOLERANCE[dtype]


def test_recurrent_fused_flags_and_in_place_state():
    """Raw gate (-exp(A_log) softplus(x + dt_bias)), L2 norm and sigmoid beta in the kernel, state updated
    in place: the same as doing each outside and calling the plain kernel."""
    B, T, H, K, V = 2, 4, 2, 32, 16
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, H, K, generator=gen)
    v = torch.randn(B, T, H, V, generator=gen)
    x = 4 * torch.randn(B, T, H, K, generator=gen)
    x[0, 1, 0, :4] = 30.0  # above softplus' linear threshold: g = -exp(A_log) * 30
    A_log = torch.log(torch.rand(H, generator=gen) * 15 + 1)
    dt_bias = torch.randn(H * K, generator=gen)
    beta_logits = torch.randn(B, T, H, generator=gen)
    state = torch.randn(B, H, K, V, generator=gen)

    g = -A_log.exp()[:, None] * F.softplus(x + dt_bias.view(H, K))
    qn = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
    kn = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    o_ref, s_ref = reference_f64(qn, kn, v, g, beta_logits.sigmoid(), state)

    pool = state.clone()
    o, s = fused_recurrent_kda_triton(
        q,
        k,
        v,
        x,
        beta_logits,
        None,
        pool,
        False,
        A_log=A_log,
        dt_bias=dt_bias,
        use_qk_l2norm_in_kernel=True,
        use_beta_sigmoid_in_kernel=True,
        inplace_final_state=True,
    )
    assert s is pool
    assert rel_err(o, o_ref) < 1e-5 and rel_err(pool, s_ref) < 1e-5
    # Into another buffer: the same state there, the initial one kept.
    start, elsewhere = state.clone(), torch.full_like(state, float("nan"))
    o, s = fused_recurrent_kda_triton(
        q,
        k,
        v,
        x,
        beta_logits,
        None,
        start,
        A_log=A_log,
        dt_bias=dt_bias,
        use_qk_l2norm_in_kernel=True,
        use_beta_sigmoid_in_kernel=True,
        final_state_out=elsewhere,
    )
    assert s is elsewhere and torch.equal(start, state)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(elsewhere, s_ref) < 1e-5


def test_recurrent_decode_steps_equal_chunked_prefill():
    """Token-by-token decode from a prefilled state continues the chunked prefill exactly."""
    q, k, v, g, beta, state = make_inputs(1, 70, 2, 16, 16, -1.0, torch.float32, seed=8)
    o, s = chunk_kda_triton(q, k, v, g, beta, None, state, True)
    _, s_pre = chunk_kda_triton(q[:, :67], k[:, :67], v[:, :67], g[:, :67], beta[:, :67], None, state, True)
    outs = []
    for t in range(67, 70):
        o_t, s_pre = fused_recurrent_kda_triton(
            q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], g[:, t : t + 1], beta[:, t : t + 1], None, s_pre, True
        )
        outs.append(o_t)
    assert rel_err(torch.cat(outs, 1), o[:, 67:]) < 1e-5 and rel_err(s_pre, s) < 1e-5


def test_empty_input_keeps_state():
    q, k, v, g, beta, state = make_inputs(1, 0, 1, 16, 16, -1.0, torch.float32, seed=1)
    for fn in (chunk_kda_triton, fused_recurrent_kda_triton):
        o, s = fn(q, k, v, g, beta, None, state, True)
        assert o.shape == (1, 0, 1, 16) and torch.equal(s, state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunk_with_nearly_parallel_keys(dtype):
    """The hard case for the chunk's (I + Akk)^-1: keys nearly parallel within a head, beta near 1 and
    slow decay make its entries large and U - W S cancel. The interpreter multiplies in fp32: the
    kernel's TF32 products on a GPU are checked on the same case by `kimi-desk bench kernels` (a Neumann
    product over whole 16-token blocks, powers up to the eighth, passed here and failed there)."""
    gen = torch.Generator().manual_seed(11)
    B, T, H, K, V = 1, 150, 2, 32, 32
    base = torch.randn(1, 1, H, K, generator=gen)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1).to(dtype)
    k = F.normalize(base + 0.05 * torch.randn(B, T, H, K, generator=gen), dim=-1).to(dtype)
    v = torch.randn(B, T, H, V, generator=gen).to(dtype)
    g = -0.01 * torch.rand(B, T, H, K, generator=gen)
    beta = (0.95 + 0.05 * torch.rand(B, T, H, generator=gen)).to(dtype)
    state = torch.randn(B, H, K, V, generator=gen)
    o_ref, s_ref = reference_f64(q, k, v, g, beta, state)
    o, s = chunk_kda_triton(q, k, v, g, beta, None, state, True)
    assert rel_err(o, o_ref) < TOLERANCE[dtype] and rel_err(s, s_ref) < TOLERANCE[dtype]
