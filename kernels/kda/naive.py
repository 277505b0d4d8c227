"""Kimi Delta Attention in plain PyTorch: the reference recurrence and the CPU paths.

Shapes follow fla: q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H, K] log-space decay (<= 0, not
bounded below); beta [B, T, H]; state [B, H, K, V] float32 (K rows, V columns). q and k arrive
L2-normalised; `scale` defaults to K ** -0.5.

Per head and token the recurrence is (kimi-linear-spec.md §3.2):
    S <- S * exp(g_t)[:, None]
    S <- S + k_t (beta_t (v_t - S^T k_t))^T
    o_t = S^T (scale q_t)
"""

from __future__ import annotations

import torch

CHUNK_SIZE = 64


def recurrent_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """Token-by-token recurrence in fp32: the reference, and the CPU path for short inputs (decode)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    q32 = q.float() * scale
    k32, v32, g32, b32 = k.float(), v.float(), g.float(), beta.float()
    state = (
        torch.zeros(B, H, K, V, dtype=torch.float32, device=q.device)
        if initial_state is None
        else initial_state.float().clone()
    )
    o = torch.empty(B, T, H, V, dtype=torch.float32, device=q.device)
    for t in range(T):
        state = state * g32[:, t].exp().unsqueeze(-1)  # [B, H, K, V]
        k_t = k32[:, t]  # [B, H, K]
        u = b32[:, t, :, None] * (v32[:, t] - torch.einsum("bhkv,bhk->bhv", state, k_t))  # [B, H, V]
        state = state + k_t.unsqueeze(-1) * u.unsqueeze(-2)
        o[:, t] = torch.einsum("bhkv,bhk->bhv", state, q32[:, t])
    return o.to(q.dtype), (state if output_final_state else None)


def chunk_kda_torch(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                    chunk_size=CHUNK_SIZE):
    """Chunked form (spec §3.3): matrix products per chunk instead of a step per token.

    Within a chunk with G = cumsum(g), every decay factor is exp(G_i - G_j) for j <= i, formed from the
    pairwise difference so that no factor above 1 is ever built: exact for any gate, however negative.
    The cumulative sums and their differences are taken in float64, since G reaches -50 * C and an fp32
    difference of two such values would lose the small decays that matter.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    scale = K**-0.5 if scale is None else scale
    device = q.device
    state = (
        torch.zeros(B, H, K, V, dtype=torch.float32, device=device)
        if initial_state is None
        else initial_state.float().clone()
    )
    if T == 0:
        return q.new_zeros(B, 0, H, V), (state if output_final_state else None)

    # Zero padding is inert: g = 0 keeps the state, beta = 0 writes nothing, k = 0 reads nothing.
    N = (T + C - 1) // C
    pad = N * C - T

    def chunked(x):  # [B, T, H, D] -> [B, H, N, C, D]
        x = x.float().transpose(1, 2)
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        return x.reshape(B, H, N, C, x.shape[-1])

    qc = chunked(q) * scale
    kc, vc = chunked(k), chunked(v)
    bc = chunked(beta.unsqueeze(-1))  # [B, H, N, C, 1]
    G64 = chunked(g).double().cumsum(-2)  # [B, H, N, C, K]
    G = G64.float()
    decay_to_end = (G64[..., -1:, :] - G64).exp().float()  # exp(G_last - G_i)
    decay_last = G[..., -1, :].exp()  # [B, H, N, K]

    causal = torch.ones(C, C, dtype=torch.bool, device=device).tril()
    strict = causal.clone().fill_diagonal_(False)
    eye = torch.eye(C, dtype=torch.float32, device=device)

    # Intra-chunk work does not depend on the state: do it for groups of chunks at once, sized so the
    # [C, C, K] decay tensor of a group stays near 32 M values.
    group = max(1, (32 << 20) // (B * H * C * C * K))
    w_all = torch.empty(B, H, N, C, K, dtype=torch.float32, device=device)
    u_all = torch.empty(B, H, N, C, V, dtype=torch.float32, device=device)
    aqk_all = torch.empty(B, H, N, C, C, dtype=torch.float32, device=device)
    for n0 in range(0, N, group):
        sl = slice(n0, min(N, n0 + group))
        Gg = G64[:, :, sl]
        diff = (Gg.unsqueeze(-2) - Gg.unsqueeze(-3)).float()  # [B, H, n, C_i, C_j, K]: G_i - G_j
        decay = diff.masked_fill(~causal[:, :, None], float("-inf")).exp_()
        kd = decay.mul_(kc[:, :, sl].unsqueeze(-3))  # k_j * exp(G_i - G_j)
        aqk = (kd @ qc[:, :, sl].unsqueeze(-1)).squeeze(-1)  # [B, H, n, C, C]
        akk = (kd @ kc[:, :, sl].unsqueeze(-1)).squeeze(-1) * bc[:, :, sl]
        akk = akk.masked_fill(~strict, 0.0)
        del kd, decay, diff
        lower = eye + akk  # unit lower-triangular
        rhs = torch.cat([bc[:, :, sl] * G[:, :, sl].exp() * kc[:, :, sl], bc[:, :, sl] * vc[:, :, sl]], dim=-1)
        wu = torch.linalg.solve_triangular(lower, rhs, upper=False, unitriangular=True)
        w_all[:, :, sl], u_all[:, :, sl] = wu[..., :K], wu[..., K:]
        aqk_all[:, :, sl] = aqk

    qg = qc * G.exp()  # [B, H, N, C, K]
    kg = kc * decay_to_end
    o = torch.empty(B, H, N, C, V, dtype=torch.float32, device=device)
    for n in range(N):
        v_new = u_all[:, :, n] - w_all[:, :, n] @ state  # [B, H, C, V]
        o[:, :, n] = qg[:, :, n] @ state + aqk_all[:, :, n] @ v_new
        state = decay_last[:, :, n].unsqueeze(-1) * state + kg[:, :, n].transpose(-1, -2) @ v_new
    o = o.reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2)
    return o.to(q.dtype), (state if output_final_state else None)
