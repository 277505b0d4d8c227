"""MLA attention over the latent cache as plain PyTorch math: the references the kernels and the
PyTorch paths (torch_attention.py) are tested against."""

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


def mla_prefill_reference(q, cache, w_uk, w_uv, q_start, scale):
    """Expanded keys and values, every score at once, float64; for tests only."""
    L = w_uk.shape[-1]
    lat = cache.double()
    k_nope = torch.einsum("bkl,hnl->bkhn", lat[..., :L], w_uk.double())
    k_rope = lat[..., L:].unsqueeze(2).expand(-1, -1, k_nope.shape[2], -1)
    k = torch.cat([k_nope, k_rope], dim=-1)  # [B, Tk, H, n + R]
    v = torch.einsum("bkl,hvl->bkhv", lat[..., :L], w_uv.double())
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k) * scale
    Tq, Tk = q.shape[1], cache.shape[1]
    visible = torch.arange(Tk)[None, :] <= (torch.arange(Tq) + q_start)[:, None]
    p = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,bkhv->bqhv", p, v).float()
