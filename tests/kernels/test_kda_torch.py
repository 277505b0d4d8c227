"""The PyTorch KDA paths (the CPU fallback) against fla-core's naive recurrence, in float64."""

import pytest
import torch
import torch.nn.functional as F
from fla.ops.kda.naive import naive_recurrent_kda

from kimi_desk.kernels.kda import chunk_kda, fused_recurrent_kda, kda
from kimi_desk.kernels.kda.naive import chunk_kda_torch, recurrent_kda

# Tolerances per dtype of the inputs (relative error against the float64 reference).
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def make_inputs(B, T, H, K, V, min_log_decay, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1).to(dtype)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1).to(dtype)
    v = torch.randn(B, T, H, V, generator=gen).to(dtype)
    # Per-channel decays anywhere in [min_log_decay, 0]: extreme and gentle channels side by side.
    g = torch.rand(B, T, H, K, generator=gen) * min_log_decay
    beta = torch.rand(B, T, H, generator=gen)
    state = torch.randn(B, H, K, V, generator=gen)
    return q, k, v, g, beta, state


def reference(q, k, v, g, beta, state):
    o, s = naive_recurrent_kda(q.double(), k.double(), v.double(), g.double(), beta.double(),
                               initial_state=state.double(), output_final_state=True)
    return o, s


def rel_err(a, b):
    assert not torch.isnan(a).any(), "NaN in the output"
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


SHAPES = [(1, 1, 2, 16, 16, -5.0), (2, 63, 2, 32, 16, -1.0), (1, 65, 3, 64, 32, -50.0),
          (2, 200, 2, 32, 32, -50.0), (1, 1000, 1, 16, 16, -0.05)]
# The step-by-step path only ever sees short inputs (decode), so it is checked up to T = 200.
CASES = [(chunk_kda_torch, *shape) for shape in SHAPES] + [(recurrent_kda, *shape) for shape in SHAPES if shape[1] <= 200]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fn,B,T,H,K,V,min_log_decay", CASES,
                         ids=[f"{c[0].__name__}-{c[1:]}" for c in CASES])
def test_matches_fla_naive(fn, dtype, B, T, H, K, V, min_log_decay):
    q, k, v, g, beta, state = make_inputs(B, T, H, K, V, min_log_decay, dtype, seed=T * 7 + K)
    o_ref, s_ref = reference(q, k, v, g, beta, state)
    o, s = fn(q, k, v, g, beta, initial_state=state, output_final_state=True)
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
    o_ref, s_ref = naive_recurrent_kda(q.double(), k.double(), v.double(), g.double(), beta.double(),
                                       output_final_state=True)
    for fn in (chunk_kda, fused_recurrent_kda, kda):
        o, s = fn(q, k, v, g, beta, output_final_state=True)
        assert rel_err(o, o_ref) < 2e-5 and rel_err(s, s_ref) < 2e-5
        o, s = fn(q, k, v, g, beta)
        assert s is None


def test_state_handoff_across_calls():
    q, k, v, g, beta, state = make_inputs(1, 150, 2, 32, 32, -3.0, torch.float32, seed=9)
    o_ref, s_ref = reference(q, k, v, g, beta, state)
    o1, s1 = chunk_kda_torch(q[:, :97], k[:, :97], v[:, :97], g[:, :97], beta[:, :97], initial_state=state,
                             output_final_state=True)
    o2, s2 = recurrent_kda(q[:, 97:], k[:, 97:], v[:, 97:], g[:, 97:], beta[:, 97:], initial_state=s1,
                           output_final_state=True)
    assert rel_err(torch.cat([o1, o2], 1), o_ref) < 2e-5 and rel_err(s2, s_ref) < 2e-5


def test_forced_torch_path(monkeypatch):
    from kimi_desk.kernels import use_triton

    monkeypatch.setenv("KIMI_DESK_KERNELS", "torch")
    assert not use_triton(torch.empty(1))
