"""Inputs and the float64 reference shared by the KDA tests (the PyTorch paths and the Triton kernels)."""

import torch
import torch.nn.functional as F


def make_inputs(B, T, H, K, V, min_log_decay, dtype, seed):
    """q and k (unit rows) and v [B, T, H, *] in `dtype`; g, beta and the initial state [B, H, K, V] in
    float32 (the Triton tests round beta to `dtype` where the kernels read it so)."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1).to(dtype)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1).to(dtype)
    v = torch.randn(B, T, H, V, generator=gen).to(dtype)
    # Per-channel decays anywhere in [min_log_decay, 0]: extreme and gentle channels side by side.
    g = torch.rand(B, T, H, K, generator=gen) * min_log_decay
    beta = torch.rand(B, T, H, generator=gen)
    state = torch.randn(B, H, K, V, generator=gen)
    return q, k, v, g, beta, state


def rel_err(a, b):
    assert not torch.isnan(a).any(), "NaN in the output (an element the kernel never wrote?)"
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def reference_f64(q, k, v, g, beta, state, scale=None):
    """The recurrence in float64 (fla's naive one computes in fp32)."""
    q, k, v, g, beta = (x.double() for x in (q, k, v, g, beta))
    q = q * (q.shape[-1] ** -0.5 if scale is None else scale)
    B, T, H, K = q.shape
    S = torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64) if state is None else state.double().clone()
    o = torch.empty_like(v)
    for t in range(T):
        S = S * g[:, t].exp().unsqueeze(-1)
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, k[:, t]))
        S = S + k[:, t].unsqueeze(-1) * u.unsqueeze(-2)
        o[:, t] = torch.einsum("bhkv,bhk->bhv", S, q[:, t])
    return o, S


def prepared_f64(q, k, x, A_log, dt_bias, beta_logits):
    """The layer's raw projections prepared in float64: (unit q, unit k (fla's eps), g = -exp(A_log)
    softplus(x + dt_bias), sigmoid(beta_logits))."""
    H, K = q.shape[-2:]
    unit = lambda t: t.double() / (t.double().square().sum(-1, keepdim=True) + 1e-6).sqrt()  # noqa: E731
    g = -A_log.double().exp()[:, None] * F.softplus(x.double() + dt_bias.double().view(H, K))
    return unit(q), unit(k), g, beta_logits.double().sigmoid()
