"""MLA attention over the latent cache in PyTorch: a materialising reference and a blocked CPU path."""

from __future__ import annotations

import torch


def mla_attention_reference(q, cache, q_start, value_dim, scale):
    """Every score at once; for tests only (memory grows as Tq * Tk)."""
    B, Tq, H, D = q.shape
    Tk = cache.shape[1]
    scores = torch.einsum("bqhd,bkd->bhqk", q.double(), cache.double()) * scale
    q_pos = torch.arange(Tq, device=q.device) + q_start
    visible = torch.arange(Tk, device=q.device)[None, :] <= q_pos[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    p = scores.softmax(-1)
    return torch.einsum("bhqk,bkd->bqhd", p, cache[..., :value_dim].double()).float()


def mla_attention_torch(q, cache, q_start, value_dim, scale, block_q=128, block_k=1024):
    """Online softmax over key blocks, one query block at a time: memory is bounded by the block sizes
    whatever the context length, and keys past a query block's last position are never touched."""
    B, Tq, H, D = q.shape
    out = torch.empty(B, Tq, H, value_dim, dtype=torch.float32, device=q.device)
    key_pos = torch.arange(block_k, device=q.device)
    for i0 in range(0, Tq, block_q):
        i1 = min(Tq, i0 + block_q)
        nq = i1 - i0
        qb = q[:, i0:i1].float().reshape(B, nq * H, D) * scale  # rows: query-major, head-minor
        row_pos = (torch.arange(i0, i1, device=q.device) + q_start).repeat_interleave(H)  # [nq * H]
        end = q_start + i1  # keys [0, end) are visible to some query of this block
        m = torch.full((B, nq * H, 1), float("-inf"), device=q.device)
        l = torch.zeros(B, nq * H, 1, device=q.device)
        acc = torch.zeros(B, nq * H, value_dim, device=q.device)
        for j0 in range(0, end, block_k):
            j1 = min(end, j0 + block_k)
            kb = cache[:, j0:j1].float()  # [B, nk, D]
            s = qb @ kb.transpose(1, 2)  # [B, nq * H, nk]
            if j1 - 1 > q_start + i0:  # the block reaches past the first query's position
                hidden = (key_pos[: j1 - j0] + j0)[None, :] > row_pos[:, None]
                s = s.masked_fill(hidden, float("-inf"))
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            p = (s - m_new).exp()
            correction = (m - m_new).exp()
            l = l * correction + p.sum(-1, keepdim=True)
            acc = acc * correction + p @ kb[..., :value_dim]
            m = m_new
        out[:, i0:i1] = (acc / l).reshape(B, nq, H, value_dim)
    return out
