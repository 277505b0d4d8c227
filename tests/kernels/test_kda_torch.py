"""The PyTorch KDA paths (the CPU path) against float64 recurrences: fla-core's naive one, and ours run in
float64 (recurrent_kda computes in the dtype of float64 inputs)."""

import pytest
import torch
import torch.nn.functional as F
from fla.ops.kda.naive import naive_recurrent_kda
from kda_cases import make_inputs, rel_err

from kimi_desk.kernels.kda import chunk_kda, fused_recurrent_kda, kda, prepare_kda
from kimi_desk.kernels.kda.naive import chunk_kda_torch, recurrent_kda, recurrent_kda_inplace

# Tolerances per dtype of the inputs (relative error against the float64 reference).
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def reference(q, k, v, g, beta, state, recurrence=naive_recurrent_kda):
    """(output, final state) of `recurrence` (fla-core's naive one unless given) on the inputs in float64."""
    return recurrence(
        q.double(),
        k.double(),
        v.double(),
        g.double(),
        beta.double(),
        initial_state=state.double(),
        output_final_state=True,
    )


SHAPES = [
    (1, 1, 2, 16, 16, -5.0),
    (2, 63, 2, 32, 16, -1.0),
    (1, 65, 3, 64, 32, -50.0),
    (2, 200, 2, 32, 32, -50.0),
    (1, 1000, 1, 16, 16, -0.05),
    (1, 130, 2, 128, 128, -3.0),
    (1, 2048, 5, 64, 64, -8.0),
]
# The step-by-step path only ever sees short inputs (decode), so it is checked up to T = 200.
CASES = [(chunk_kda_torch, *shape) for shape in SHAPES] + [
    (recurrent_kda, *shape) for shape in SHAPES if shape[1] <= 200
]


def poisoned(fn):
    """fn with its output buffers (torch.empty) filled with NaN before it writes them: a value it never
    wrote shows as NaN."""

    def run(*args, **kwargs):
        real_empty = torch.empty

        def empty(*shape, **options):
            return real_empty(*shape, **options).fill_(float("nan"))

        torch.empty = empty
        try:
            return fn(*args, **kwargs)
        finally:
            torch.empty = real_empty

    return run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fn,B,T,H,K,V,min_log_decay", CASES, ids=[f"{c[0].__name__}-{c[1:]}" for c in CASES])
def test_matches_fla_naive(fn, dtype, B, T, H, K, V, min_log_decay):
    q, k, v, g, beta, state = make_inputs(B, T, H, K, V, min_log_decay, dtype, seed=T * 7 + K)
    o_ref, s_ref = reference(q, k, v, g, beta, state)
    o, s = poisoned(fn)(q, k, v, g, beta, initial_state=state, output_final_state=True)
    assert o.dtype == dtype and s.dtype == torch.float32
    assert rel_err(o, o_ref) < TOLERANCE[dtype]
    assert rel_err(s, s_ref) < TOLERANCE[dtype]


def test_far_beyond_fifty_per_step_stays_finite():
    """Log-decays far below -50 (the gate has no lower bound): no inf, no NaN, the state forgets."""
    q, k, v, g, beta, state = make_inputs(1, 130, 2, 32, 32, -1.0, torch.float32, seed=3)
    g[:, 64] = -1e4
    o_ref, s_ref = reference(q, k, v, g, beta, state)
    o, s = chunk_kda_torch(q, k, v, g, beta, initial_state=state, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


def test_public_functions_and_defaults_on_cpu():
    q, k, v, g, beta, _ = make_inputs(1, 70, 2, 16, 16, -2.0, torch.float32, seed=5)
    o_ref, s_ref = naive_recurrent_kda(
        q.double(), k.double(), v.double(), g.double(), beta.double(), output_final_state=True
    )
    for fn in (chunk_kda, fused_recurrent_kda, kda):
        o, s = fn(q, k, v, g, beta, output_final_state=True)
        assert rel_err(o, o_ref) < 2e-5 and rel_err(s, s_ref) < 2e-5
        o, s = fn(q, k, v, g, beta)
        assert s is None


def test_state_handoff_across_calls():
    q, k, v, g, beta, state = make_inputs(1, 150, 2, 32, 32, -3.0, torch.float32, seed=9)
    o_ref, s_ref = reference(q, k, v, g, beta, state)
    o1, s1 = chunk_kda_torch(
        q[:, :97], k[:, :97], v[:, :97], g[:, :97], beta[:, :97], initial_state=state, output_final_state=True
    )
    o2, s2 = recurrent_kda(
        q[:, 97:], k[:, 97:], v[:, 97:], g[:, 97:], beta[:, 97:], initial_state=s1, output_final_state=True
    )
    assert rel_err(torch.cat([o1, o2], 1), o_ref) < 2e-5 and rel_err(s2, s_ref) < 2e-5


def test_forced_torch_path(monkeypatch):
    from kimi_desk.kernels import use_triton

    monkeypatch.setenv("KIMI_DESK_KERNELS", "torch")
    assert not use_triton(torch.empty(1))


@pytest.mark.parametrize("chunk_size", [2, 16, 32, 64, 128])
@pytest.mark.parametrize("T", [1, 63, 64, 65, 300])
def test_chunk_sizes_against_our_recurrence_in_float64(chunk_size, T):
    """Every chunk size (each adds or drops a level of the halving) against recurrent_kda in float64."""
    q, k, v, g, beta, state = make_inputs(1, T, 2, 32, 24, -4.0, torch.float32, seed=T + chunk_size)
    o_ref, s_ref = reference(q, k, v, g, beta, state, recurrence=recurrent_kda)
    assert o_ref.dtype == s_ref.dtype == torch.float64
    o, s = chunk_kda_torch(q, k, v, g, beta, initial_state=state, output_final_state=True, chunk_size=chunk_size)
    assert rel_err(o, o_ref) < 2e-5 and rel_err(s, s_ref) < 2e-5


def test_small_decays_after_a_huge_one_keep_their_precision():
    """A huge decay early in a chunk makes the cumulative sums large; the small decays after it must not
    lose their precision in the differences (they are taken in float64 and rounded once)."""
    q, k, v, g, beta, state = make_inputs(1, 256, 2, 32, 32, -0.02, torch.float32, seed=11)
    g[:, 1::64] = -3000.0  # the second token of every chunk erases the state's past
    o_ref, s_ref = reference(q, k, v, g, beta, state)
    o, s = chunk_kda_torch(q, k, v, g, beta, initial_state=state, output_final_state=True)
    assert rel_err(o, o_ref) < 2e-6 and rel_err(s, s_ref) < 2e-6


def test_empty_and_without_state():
    q, k, v, g, beta, state = make_inputs(2, 0, 2, 16, 8, -1.0, torch.float32, seed=1)
    o, s = chunk_kda_torch(q, k, v, g, beta, initial_state=state, output_final_state=True)
    assert o.shape == (2, 0, 2, 8) and torch.equal(s, state)
    q, k, v, g, beta, _ = make_inputs(2, 40, 2, 16, 8, -1.0, torch.bfloat16, seed=2)
    o_ref, s_ref = reference(q, k, v, g, beta, torch.zeros(2, 2, 16, 8))
    o, s = chunk_kda_torch(q, k, v, g, beta, output_final_state=True)
    assert o.dtype == torch.bfloat16 and rel_err(o, o_ref) < 2e-2 and rel_err(s, s_ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T,min_log_decay", [(1, -5.0), (3, -50.0), (16, -1.0)])
def test_inplace_recurrence_for_decode(dtype, T, min_log_decay):
    """The decode step advances the given state in place (its storage stays), output and state as the
    float64 recurrence."""
    q, k, v, g, beta, state = make_inputs(2, T, 3, 32, 16, min_log_decay, dtype, seed=T)
    o_ref, s_ref = reference(q, k, v, g, beta, state)
    storage = state.data_ptr()
    o = poisoned(recurrent_kda_inplace)(q, k, v, g, beta, state)
    assert o.dtype == dtype and state.data_ptr() == storage
    assert rel_err(o, o_ref) < TOLERANCE[dtype] and rel_err(state, s_ref) < 2e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prepare_from_raw_projections(dtype):
    """prepare_kda on CPU tensors (the PyTorch reference of the prepass): q and k to unit rows with fla's
    eps, stored in their dtype; the gate and beta's sigmoid in fp32; all against float64."""
    B, T, H, K = 2, 9, 3, 32
    gen = torch.Generator().manual_seed(8)
    q, k, x = ((s * torch.randn(B, T, H, K, generator=gen)).to(dtype) for s in (3.0, 0.2, 2.0))
    x[0, 0, 0, 0] = 30.0  # softplus' linear side
    beta_logits = (2 * torch.randn(B, T, H, generator=gen)).to(dtype)
    A_log, dt_bias = torch.rand(H, generator=gen) * 2.7, torch.randn(H * K, generator=gen)
    qn, kn, g, beta = prepare_kda(q, k, x, A_log, dt_bias, beta_logits)
    assert (qn.dtype, kn.dtype, g.dtype, beta.dtype) == (dtype, dtype, torch.float32, torch.float32)
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-21
    for ours, raw in ((qn, q), (kn, k)):
        unit = raw.double() / (raw.double().square().sum(-1, keepdim=True) + 1e-6).sqrt()
        assert ((ours.double() - unit).abs() <= ulp * unit.abs()).all()
    g_ref = -A_log.double().exp()[:, None] * F.softplus(x.double() + dt_bias.double().view(H, K))
    assert torch.allclose(g.double(), g_ref, rtol=1e-6, atol=1e-6)
    assert torch.allclose(beta.double(), beta_logits.double().sigmoid(), rtol=1e-6, atol=0)
