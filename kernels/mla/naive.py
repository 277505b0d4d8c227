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


def mla_prefill_torch(q, cache, w_uk, w_uv, q_start, scale, block_q=512, block_k=1024):
    """Prefill attention with keys and values expanded from the latents, block by block.

    For many queries the expanded form is the cheaper one: per query, key and head it costs
    n + R + v multiply-adds against 2 L + R for the absorbed form (320 against 1088 at the 48B shapes).
    Each key block is expanded once and visited by every query block that sees it, with an online
    softmax per query, so memory stays bounded by the block sizes at any context length.

    q [B, Tq, H, n + R] (q_nope ‖ q_rope); cache [B, Tk, L + R]; w_uk [H, n, L]; w_uv [H, v, L].
    Returns [B, Tq, H, v] float32.
    """
    B, Tq, H, _ = q.shape
    L, V = w_uk.shape[-1], w_uv.shape[1]
    device = q.device
    qf = q.float().transpose(1, 2) * scale  # [B, H, Tq, n + R]
    w_uk32, w_uv32 = w_uk.float(), w_uv.float()
    m = torch.full((B, H, Tq, 1), float("-inf"), device=device)
    l = torch.zeros(B, H, Tq, 1, device=device)
    acc = torch.zeros(B, H, Tq, V, device=device)
    q_pos = torch.arange(Tq, device=device) + q_start
    end = q_start + Tq
    for j0 in range(0, end, block_k):
        j1 = min(end, j0 + block_k)
        lat = cache[:, j0:j1].float()  # [B, nk, L + R]
        k_nope = torch.einsum("bkl,hnl->bhkn", lat[..., :L], w_uk32)
        k_rope = lat[..., L:].unsqueeze(1).expand(-1, H, -1, -1)
        k_t = torch.cat([k_nope, k_rope], dim=-1).transpose(-1, -2)  # [B, H, n + R, nk]
        v = torch.einsum("bkl,hvl->bhkv", lat[..., :L], w_uv32)  # [B, H, nk, v]
        key_pos = torch.arange(j0, j1, device=device)
        for i0 in range(max(0, j0 - q_start), Tq, block_q):
            i1 = min(Tq, i0 + block_q)
            s = qf[:, :, i0:i1] @ k_t  # [B, H, bq, nk]
            if j1 - 1 > q_start + i0:  # some key of the block lies after some query of the block
                s = s.masked_fill(key_pos[None, :] > q_pos[i0:i1, None], float("-inf"))
            m_old = m[:, :, i0:i1]
            m_new = torch.maximum(m_old, s.amax(-1, keepdim=True))
            p = (s - m_new).exp_()
            correction = (m_old - m_new).exp_()
            l[:, :, i0:i1] = l[:, :, i0:i1] * correction + p.sum(-1, keepdim=True)
            acc[:, :, i0:i1] = acc[:, :, i0:i1] * correction + p @ v
            m[:, :, i0:i1] = m_new
    return (acc / l).transpose(1, 2)


def mla_attention_dense(q, cache, q_start, value_dim, scale):
    """The absorbed form in one pass, for a GPU at decode: a few queries against the whole cache, scores
    for every key at once ([B, Tq * H, Tk] float32: 128 MB at 1M keys and 32 heads). Products run in the
    cache's dtype with float32 accumulation."""
    B, Tq, H, D = q.shape
    Tk = cache.shape[1]
    qc = (q.float() * scale).to(cache.dtype).reshape(B, Tq * H, D)
    scores = torch.matmul(qc, cache.transpose(1, 2)).float()  # [B, Tq * H, Tk]
    if Tq > 1:
        row_pos = (torch.arange(Tq, device=q.device) + q_start).repeat_interleave(H)
        scores = scores.masked_fill(torch.arange(Tk, device=q.device)[None, :] > row_pos[:, None], float("-inf"))
    p = scores.softmax(-1).to(cache.dtype)
    return torch.matmul(p, cache[..., :value_dim]).float().reshape(B, Tq, H, value_dim)


# Cached keys are expanded and attended this many at a time in the GPU's prefill: bounds its transient
# memory (expanded keys and values, 20 KB a key at the 48B shapes: 1.3 GB) at any context length.
PREFILL_KEY_BLOCK = 65536


def mla_prefill_sdpa(q, cache, w_uk, w_uv, q_start, scale, key_block=PREFILL_KEY_BLOCK):
    """Prefill on a GPU through fused attention kernels, keys and values expanded from the latents one
    block of keys at a time, so memory stays bounded at any cache length.

    The chunk's queries see every cached key (positions before q_start): those blocks need no mask. The
    chunk's own keys are a causal square. Each block's attention returns its normalised output and the
    log-sum-exp of its scores per (query, head); the blocks merge exactly by those weights (the
    online-softmax rule), in float32. Products run in the cache's dtype with float32 accumulation."""
    B, Tq, H, _ = q.shape
    L, R = w_uk.shape[-1], cache.shape[-1] - w_uk.shape[-1]
    n, V = w_uk.shape[1], w_uv.shape[1]
    dtype = cache.dtype
    # One product expands a block of latents [c | k_r] into every head's key [k_nope | k_r]: the key
    # matrix maps c through W_UK and k_r through an identity (exact: products by 1 and sums with 0). Its
    # output, viewed [B, H, nk, n + R] with the tokens' stride, goes to the attention kernel as it is: no
    # concatenation, no copy (they took 11% of a chunk's GPU time at 1M cached tokens).
    w_k = torch.zeros(L + R, H, n + R, dtype=dtype, device=q.device)
    w_k[:L, :, :n] = w_uk.permute(2, 0, 1)
    w_k[L:, :, n:] = torch.eye(R, dtype=dtype, device=q.device).unsqueeze(1)
    w_k = w_k.view(L + R, H * (n + R))
    w_v = w_uv.to(dtype).permute(2, 0, 1).reshape(L, H * V)
    queries = q.to(dtype).transpose(1, 2)  # [B, H, Tq, n + R]
    attend = _attention_with_lse(q.device, dtype)

    def expanded(j0, j1):
        block = cache[:, j0:j1]
        k = (block @ w_k).view(B, j1 - j0, H, n + R).transpose(1, 2)
        v = (block[..., :L] @ w_v).view(B, j1 - j0, H, V).transpose(1, 2)
        return k, v

    out, lse = attend(queries, *expanded(q_start, q_start + Tq), True, scale)
    out = out.float()
    for j0 in range(0, q_start, key_block):
        block_out, block_lse = attend(queries, *expanded(j0, min(q_start, j0 + key_block)), False, scale)
        merged = torch.logaddexp(lse, block_lse)
        out.mul_((lse - merged).exp_().unsqueeze(-1))
        out.add_(block_out * (block_lse - merged).exp_().unsqueeze(-1))
        lse = merged
    return out.transpose(1, 2)


def _attention_with_lse(device, dtype):
    """attend(q [B, H, Tq, D], k [B, H, Tk, D], v [B, H, Tk, V], causal, scale) -> (out [B, H, Tq, V],
    natural log-sum-exp of the scaled scores [B, H, Tq] float32); `causal` for Tq == Tk only.

    On CUDA in bf16 or fp16, cuDNN's fused attention: on an H100 (2026-11-27,
    packaging/gpu_checks/mla_prefill_sdpa.py) 630 TFLOP/s with the values 128 wide, against 277 for the
    flash attention kernel PyTorch picks by default, which also wants the values padded to the keys' 192.
    A GPU or build without cuDNN's takes that flash kernel. float32 on CUDA (checks; neither kernel takes
    it) takes the memory-efficient kernel. On the CPU (tests) the scores are materialised."""
    if device.type != "cuda":
        return _math_attention
    if dtype == torch.float32:
        return _efficient_attention
    return _cudnn_attention if _cudnn_attention_works(device) else _flash_attention


def _cudnn_attention(q, k, v, causal, scale):
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    return out[0], out[1].reshape(q.shape[:-1])


def _flash_attention(q, k, v, causal, scale):
    V = v.shape[-1]
    if V < q.shape[-1]:
        v = torch.nn.functional.pad(v, (0, q.shape[-1] - V))
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return out[0][..., :V], out[1]


def _efficient_attention(q, k, v, causal, scale):
    out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)
    return out[0], out[1][..., : q.shape[-2]]  # its log-sum-exp is padded to a multiple of 32 queries


def _math_attention(q, k, v, causal, scale):
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    lse = s.logsumexp(-1)
    return (s - lse.unsqueeze(-1)).exp() @ v.float(), lse


_cudnn_works: dict = {}


def _cudnn_attention_works(device) -> bool:
    """Whether cuDNN's attention runs here and agrees with the materialised form (asked once per device:
    it needs a recent GPU and a cuDNN build that has it)."""
    key = torch.device(device).index or 0
    if key not in _cudnn_works:
        gen = torch.Generator(device=device).manual_seed(0)
        q, k = (torch.randn(1, 2, 16, 192, device=device, generator=gen, dtype=torch.bfloat16) for _ in range(2))
        v = torch.randn(1, 2, 16, 128, device=device, generator=gen, dtype=torch.bfloat16)
        try:
            out, lse = _cudnn_attention(q, k, v, True, 0.1)
            want, want_lse = _math_attention(q, k, v, True, 0.1)
            _cudnn_works[key] = bool(torch.allclose(out.float(), want, atol=2e-2) and
                                     torch.allclose(lse, want_lse, atol=2e-2))
        except RuntimeError:
            _cudnn_works[key] = False
    return _cudnn_works[key]
