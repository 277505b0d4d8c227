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
                    chunk_size=CHUNK_SIZE, sub_chunk_size=8):
    """Chunked form (spec §3.3): matrix products per chunk instead of a step per token.

    Every decay factor inside a chunk is exp(G_i - G_j) for j <= i, with G = cumsum(g). It is never
    formed as exp(G_i) * exp(-G_j), which overflows for Kimi Linear's unbounded gates. Within a
    sub-chunk the factor is built pairwise from the difference; across sub-chunks it factors through a
    reference position r with j <= r <= i, exp(G_i - G_r) * exp(G_r - G_j), both factors <= 1, so those
    blocks become plain matrix products. Cumulative sums and differences are taken in float64, since
    G reaches -50 * C and an fp32 difference of two such values would lose the small decays that matter.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C, S = chunk_size, sub_chunk_size
    assert C % S == 0
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

    aqk = torch.zeros(B, H, N, C, C, dtype=torch.float32, device=device)
    akk = torch.zeros(B, H, N, C, C, dtype=torch.float32, device=device)
    for a in range(C // S):
        rows = slice(a * S, (a + 1) * S)
        G_rows = G64[..., rows, :]
        q_rows, k_rows = qc[..., rows, :], kc[..., rows, :]
        # Diagonal block: pairwise decays [.., S_i, S_j, K], from sums local to the sub-chunk (fp32 is
        # enough there: at most S steps). Above the diagonal the difference is >= 0: clamp it to 0 so
        # nothing overflows, and drop those entries afterwards.
        G_local = (G_rows - G_rows[..., :1, :]).float()
        diff = G_local.unsqueeze(-2) - G_local.unsqueeze(-3)
        kd = diff.clamp_max_(0.0).exp_().mul_(k_rows.unsqueeze(-3))
        aqk[..., rows, rows] = (kd @ q_rows.unsqueeze(-1)).squeeze(-1).tril_()
        akk[..., rows, rows] = (kd @ k_rows.unsqueeze(-1)).squeeze(-1).tril_(-1)
        if a:
            # Earlier sub-chunks, through the reference r = the first row of this sub-chunk.
            r = a * S
            G_ref = G64[..., r : r + 1, :]
            to_ref = (G_rows - G_ref).float().exp_()  # exp(G_i - G_r), i >= r
            from_ref = kc[..., :r, :] * (G_ref - G64[..., :r, :]).float().exp_()  # k_j exp(G_r - G_j), j < r
            aqk[..., rows, :r] = (q_rows * to_ref) @ from_ref.transpose(-1, -2)
            akk[..., rows, :r] = (k_rows * to_ref) @ from_ref.transpose(-1, -2)
    akk.mul_(bc)
    # (I + A_kk) is unit lower-triangular: W = T (beta exp(G) K), U = T (beta V) by substitution.
    decay_from_start = G64.float().exp_()  # exp(G_i), <= 1
    eye = torch.eye(C, dtype=torch.float32, device=device)
    rhs = torch.cat([bc * decay_from_start * kc, bc * vc], dim=-1)
    wu = torch.linalg.solve_triangular(eye + akk, rhs, upper=False, unitriangular=True)
    w, u = wu[..., :K], wu[..., K:]

    qg = qc * decay_from_start  # [B, H, N, C, K]
    kg = kc * (G64[..., -1:, :] - G64).float().exp_()  # k_i exp(G_last - G_i)
    decay_last = decay_from_start[..., -1, :].unsqueeze(-1)  # [B, H, N, K, 1]
    o = torch.empty(B, H, N, C, V, dtype=torch.float32, device=device)
    for n in range(N):
        v_new = u[:, :, n] - w[:, :, n] @ state  # [B, H, C, V]
        o[:, :, n] = qg[:, :, n] @ state + aqk[:, :, n] @ v_new
        state = decay_last[:, :, n] * state + kg[:, :, n].transpose(-1, -2) @ v_new
    o = o.reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2)
    return o.to(q.dtype), (state if output_final_state else None)
