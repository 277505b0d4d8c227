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
import torch.nn.functional as F

CHUNK_SIZE = 64


def log_decay(x, A_log, dt_bias):
    """Kimi Linear's log decay -exp(A_log) * softplus(x + dt_bias) in fp32 (softplus linear above 20, as
    fla's), from the gate input x [..., H, K], A_log (H elements) and dt_bias (H * K)."""
    H, K = x.shape[-2:]
    return -A_log.float().reshape(H, 1).exp() * F.softplus(x.float() + dt_bias.float().view(H, K), threshold=20.0)


def prepare_kda_torch(q, k, x, A_log, dt_bias, beta_logits):
    """The layer's prefill inputs from its raw projections, as prepare.py's kernel writes them: q, k
    [B, T, H, K] L2-normalised as fla does (x * rsqrt(sum x^2 + 1e-6) in fp32, stored in their dtype), the
    log decay g = -exp(A_log) * softplus(x + dt_bias) (softplus linear above 20, as fla's) and
    beta = sigmoid(beta_logits), both fp32. A_log holds H elements, dt_bias H * K. The layer's prefill on
    the CPU (engine/kda.py)."""

    def unit(t):
        t32 = t.float()
        return (t32 * torch.rsqrt((t32 * t32).sum(-1, keepdim=True) + 1e-6)).to(t.dtype)

    return unit(q), unit(k), log_decay(x, A_log, dt_bias), torch.sigmoid(beta_logits.float())


def recurrent_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """Token-by-token recurrence: the reference, and the CPU path for short inputs (decode). It computes
    in float32, or in float64 when q is float64 (the tests' reference); the state has that dtype."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q32 = q.to(dtype) * scale
    k32, v32, g32, b32 = k.to(dtype), v.to(dtype), g.to(dtype), beta.to(dtype)
    state = (
        torch.zeros(B, H, K, V, dtype=dtype, device=q.device)
        if initial_state is None
        else initial_state.to(dtype).clone()
    )
    o = torch.empty(B, T, H, V, dtype=dtype, device=q.device)
    for t in range(T):
        state = state * g32[:, t].exp().unsqueeze(-1)  # [B, H, K, V]
        k_t = k32[:, t]  # [B, H, K]
        u = b32[:, t, :, None] * (v32[:, t] - torch.einsum("bhkv,bhk->bhv", state, k_t))  # [B, H, V]
        state = state + k_t.unsqueeze(-1) * u.unsqueeze(-2)
        o[:, t] = torch.einsum("bhkv,bhk->bhv", state, q32[:, t])
    return o.to(q.dtype), (state if output_final_state else None)


def recurrent_kda_inplace(q, k, v, g, beta, state, scale=None):
    """The recurrence for a few tokens on the CPU (decode): the same function as recurrent_kda, with the
    float32 `state` [B, H, K, V] advanced in place, in a handful of operations per token (recurrent_kda
    copies the state and takes three times as many, which a decode step of six KDA layers pays for in
    per-operation overhead). Returns o [B, T, H, V] in q's dtype."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    decay = g.float().exp().unsqueeze(-1)  # [B, T, H, K, 1]
    qs = (q.float() * scale).unsqueeze(-2)  # [B, T, H, 1, K]
    ks = k.float().unsqueeze(-2)  # [B, T, H, 1, K]
    vs = v.float().unsqueeze(-2)  # [B, T, H, 1, V]
    bs = beta.float()[..., None, None]  # [B, T, H, 1, 1]
    o = torch.empty(B, T, H, V, dtype=torch.float32, device=q.device)
    for t in range(T):
        state.mul_(decay[:, t])
        u = (vs[:, t] - ks[:, t] @ state).mul_(bs[:, t])  # beta (v - S^T k), [B, H, 1, V]
        state.add_(ks[:, t].transpose(-1, -2) @ u)
        o[:, t] = (qs[:, t] @ state).squeeze(-2)
    return o.to(q.dtype)


def chunk_kda_torch(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, chunk_size=CHUNK_SIZE, inputs=None
):
    """Chunked form (spec §3.3): batched matrix products over every chunk at once, and a loop over the
    chunks for the state alone (one product each).

    Per chunk of C tokens, with G = cumsum(g) from the chunk's start, the decay between tokens j <= i is
    exp(G_i - G_j), never formed as exp(G_i) * exp(-G_j), which overflows for Kimi Linear's unbounded
    gates. The strictly lower triangle of A_qk[i, j] = sum_d q_i k_j exp(G_i - G_j) (and of A_kk) is
    built by halving: the lower-left quadrant of each diagonal block of b tokens (b = 2, 4, .., C), rows
    in its second half and columns in its first, factors through the first row r of the second half,
    exp(G_i - G_r) * exp(G_r - G_j), both factors <= 1, so each quadrant is one batched product with
    nothing to overflow and no pairwise [C, C, K] decay tensor. G is summed in float64 and each factor's
    exponent is a float64 difference rounded once: G reaches -50 * C, and an fp32 difference of two such
    values would lose the small decays that matter.

    The same quadrants give the inverse T of the unit lower-triangular (I + beta A_kk) block by block,
    [[T1, 0], [-T2 A21 T1, T2]] (a triangular solve of many small matrices is far slower on the CPU
    than these products), so W = T (beta exp(G) K) and U = T (beta V). Then per chunk
    S' = (diag(exp(G_C)) - K_g^T W) S + K_g^T U, K_g = K exp(G_C - G), is one product in the loop, and
    every output o = (Q exp(G) - A_qk W) S + A_qk U is one batched product after it.

    `inputs` makes every chunk's A_qk, T and the products' other inputs (`chunk_inputs_torch` here;
    kernels/kda/avx2.py's `chunk_inputs` is the same arithmetic in C, one chunk at a time in the core's
    cache, from the layer's tensors as they are).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    assert C & (C - 1) == 0, "the chunk size is a power of two"
    scale = K**-0.5 if scale is None else scale
    device = q.device
    BH = B * H
    if T == 0:
        state = (
            torch.zeros(B, H, K, V, dtype=torch.float32, device=device)
            if initial_state is None
            else initial_state.float().clone()
        )
        return q.new_zeros(B, 0, H, V), (state if output_final_state else None)

    N = (T + C - 1) // C
    X = N * BH  # chunks of every sequence and head, chunk-major: the state loop reads contiguous slices
    aqk, inverse, rhs, kg, qg, last = (inputs or chunk_inputs_torch)(q, k, v, g, beta, scale, C)
    wu = torch.bmm(inverse, rhs)  # [X, C, K + V]: W | U
    kwu = torch.bmm(kg.transpose(1, 2), wu)  # [X, K, K + V]
    transition = kwu[..., :K].neg_()
    torch.diagonal(transition, dim1=1, dim2=2).add_(last)  # diag(exp(G_C)) - K_g^T W
    awu = torch.bmm(aqk, wu)  # [X, C, K + V]
    reads = qg.sub_(awu[..., :K])  # Q exp(G) - A_qk W

    states = torch.empty(N + 1, BH, K, V, dtype=torch.float32, device=device)  # at each chunk's start
    states[0] = torch.zeros(BH, K, V, device=device) if initial_state is None else initial_state.reshape(BH, K, V)
    transition, writes = transition.view(N, BH, K, K), kwu[..., K:].view(N, BH, K, V)
    for c in range(N):
        torch.baddbmm(writes[c], transition[c], states[c], out=states[c + 1])
    o = torch.baddbmm(awu[..., K:], reads, states[:N].view(X, K, V))  # [X, C, V]
    o = o.view(N, B, H, C, V).permute(1, 0, 3, 2, 4).reshape(B, N * C, H, V)[:, :T]
    return o.to(q.dtype), (states[N].view(B, H, K, V) if output_final_state else None)


def chunk_inputs_torch(q, k, v, g, beta, scale, C):
    """The chunked form's inputs for every chunk x of C tokens (chunk-major, then sequence, then head),
    G the float64 sum of g from the chunk's start: A_qk and T [X, C, C] (halving_blocks), the right-hand
    side [X, C, K + V] = [beta exp(G) K | beta V], K_g = K exp(G_C - G) [X, C, K], Q exp(G) [X, C, K]
    (q scaled) and exp(G_C) [X, K]."""
    B, T, H, _ = q.shape
    N = (T + C - 1) // C
    X, pad = N * B * H, N * C - T

    def chunked(x):  # [B, T, H, D] -> [X, C, D]; zero padding is inert (g = 0, beta = 0, k = 0)
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
        return x.view(B, N, C, H, x.shape[-1]).permute(1, 0, 3, 2, 4).reshape(X, C, x.shape[-1])

    qk = torch.stack([chunked(q), chunked(k)], dim=2).float()  # [X, C, 2, K]: each token's q and k
    qk[:, :, 0].mul_(scale)
    bc = chunked(beta.unsqueeze(-1)).float()  # [X, C, 1]
    G = chunked(g).double().cumsum_(1)  # [X, C, K] float64
    aqk, inverse = halving_blocks(qk, bc, G)
    decay = G.float().exp_()  # exp(G_i), <= 1
    rhs = torch.cat([decay * qk[:, :, 1], chunked(v).float()], dim=-1).mul_(bc)
    kg = qk[:, :, 1] * (G[:, -1:] - G).float().exp_()  # k_i exp(G_C - G_i)
    return aqk, inverse, rhs, kg, qk[:, :, 0].mul_(decay), decay[:, -1]


def halving_blocks(qk, bc, G):
    """Every chunk's A_qk (its strictly lower triangle and diagonal) and T, both [X, C, C], from qk
    [X, C, 2, K] (q scaled, k), bc [X, C, 1] (beta) and G [X, C, K] (float64 gates summed from the
    chunk's start), by halving (chunk_kda_torch's docstring)."""
    X, C, _, K = qk.shape
    aqk = torch.zeros(X, C, C, dtype=torch.float32, device=qk.device)
    torch.diagonal(aqk, dim1=1, dim2=2).copy_((qk[:, :, 0] * qk[:, :, 1]).sum(-1))
    inverse = torch.zeros(X, C, C, dtype=torch.float32, device=qk.device)
    torch.diagonal(inverse, dim1=1, dim2=2).fill_(1.0)
    b = 2
    while b <= C:
        h, n = b // 2, C // b  # quadrants of h x h, n diagonal blocks per chunk
        G_blocks = G.view(X, n, 2, h, K)
        G_ref = G_blocks[:, :, 1, :1]  # G_r, r the first row of each second half
        to_ref = (G_blocks[:, :, 1] - G_ref).float().exp_()  # exp(G_i - G_r), i >= r
        from_ref = (G_ref - G_blocks[:, :, 0]).float().exp_()  # exp(G_r - G_j), j < r
        halves = qk.view(X, n, 2, h, 2, K)
        rows = halves[:, :, 1] * to_ref.unsqueeze(-2)  # [X, n, h, 2, K]: q_i and k_i, scaled
        cols = halves[:, :, 0, :, 1] * from_ref  # [X, n, h, K]: k_j, scaled
        quadrant = _products(rows.view(X * n, 2 * h, K), cols.view(X * n, h, K).transpose(1, 2))
        quadrant = quadrant.view(X, n, h, 2, h)  # [.., i, (A_qk, A_kk), j]
        _diagonal_blocks(aqk, n)[:, :, h:, :h].copy_(quadrant[:, :, :, 0])
        a21 = quadrant[:, :, :, 1] * bc.view(X, n, 2, h, 1)[:, :, 1]  # beta_i k_i . k_j decay
        blocks = _diagonal_blocks(inverse, n)  # [X, n, b, b], the inverses of the halves already in place
        blocks[:, :, h:, :h] = _products(_products(blocks[:, :, h:, h:], a21), blocks[:, :, :h, :h]).neg_()
        b *= 2
    return aqk, inverse


def _diagonal_blocks(m, n):
    """The n diagonal blocks of each [C, C] matrix of m [X, C, C], as a writable view [X, n, C/n, C/n]."""
    X, C = m.shape[0], m.shape[-1]
    return torch.diagonal(m.view(X, n, C // n, n, C // n), dim1=1, dim2=3).permute(0, 3, 1, 2)


def _products(a, b):
    """a @ b over leading dimensions; products of a few entries each (rows x columns <= 8) by
    broadcasting, which costs less than a batched product call per tiny matrix."""
    if a.shape[-2] * b.shape[-1] <= 8:
        return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)
    return torch.matmul(a, b)
