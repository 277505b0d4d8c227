"""MLA attention in PyTorch: the CPU paths (PyTorch's fused flash-attention kernel for the CPU, key
block by key block, memory bounded at any context length), the GPU's prefill through cuDNN's fused
attention on key blocks expanded from the latents, and the GPU's dense form for KIMI_DESK_KERNELS=torch.
The float64 references they are tested against are in naive.py."""

from __future__ import annotations

import torch

from kimi_desk.kernels import float32_of
from kimi_desk.kernels.mla import avx2


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


def absorb_queries_torch(q, kv_b_weight, nope_dim, v_dim):
    """q [B, T, H, n + R] -> [W_UK^T q_nope ‖ q_rope] [B, T, H, L + R] in float32, W_UK read from
    kv_b_proj's weight [H * (n + v), L]."""
    H, L = q.shape[2], kv_b_weight.shape[1]
    w_uk = float32_of(kv_b_weight).view(H, nope_dim + v_dim, L)[:, :nope_dim]
    q_nope, q_rope = q.split([nope_dim, q.shape[-1] - nope_dim], dim=-1)
    return torch.cat([torch.einsum("bthn,hnl->bthl", q_nope.float(), w_uk), q_rope.float()], dim=-1)


def values_torch(attended, kv_b_weight, nope_dim, v_dim, out_dtype):
    """attended [B, T, H, L] float32 -> W_UV attended [B, T, H, v] in out_dtype."""
    H, L = attended.shape[2], kv_b_weight.shape[1]
    w_uv = float32_of(kv_b_weight).view(H, nope_dim + v_dim, L)[:, nope_dim:]
    return torch.einsum("bthl,hvl->bthv", attended, w_uv).to(out_dtype)


# Cached keys are expanded and attended this many at a time in the prefill: bounds its transient memory
# (expanded keys and values, 20 KB a key at the 48B shapes: 1.3 GB on a GPU) at any context length. The
# CPU takes smaller blocks: its caches are smaller than a GPU's memory, and so is its memory.
PREFILL_KEY_BLOCK = 65536
CPU_KEY_BLOCK = 16384


def mla_prefill_sdpa(q, cache, w_uk, w_uv, q_start, scale, key_block=None):
    """Prefill through fused attention kernels (cuDNN's on a GPU, PyTorch's flash kernel on the CPU),
    keys and values expanded from the latents one block of keys at a time, so memory stays bounded at
    any cache length.

    The chunk's queries see every cached key (positions before q_start): those blocks need no mask. The
    chunk's own keys are a causal square. Each block's attention returns its normalised output and the
    log-sum-exp of its scores per (query, head); the blocks merge exactly by those weights (the
    online-softmax rule), in float32. Products run in the wider of the cache's and the queries' dtypes (a
    bfloat16 cache under float32 queries: its blocks widened as they are expanded) with float32
    accumulation."""
    B, Tq, H, _ = q.shape
    L, R = w_uk.shape[-1], cache.shape[-1] - w_uk.shape[-1]
    n, V = w_uk.shape[1], w_uv.shape[1]
    dtype, device = torch.promote_types(cache.dtype, q.dtype), q.device
    key_block = key_block or (PREFILL_KEY_BLOCK if device.type == "cuda" else CPU_KEY_BLOCK)
    # One product expands a block of latents [c | k_r] into every head's key [k_nope | k_r]: the key
    # matrix maps c through W_UK and k_r through an identity (exact: products by 1 and sums with 0). Its
    # output, viewed [B, H, nk, n + R] with the tokens' stride, goes to the attention kernel as it is: no
    # concatenation, no copy (they took 11% of a chunk's GPU time at 1M cached tokens).
    w_k = torch.zeros(L + R, H, n + R, dtype=dtype, device=device)
    w_k[:L, :, :n] = w_uk.permute(2, 0, 1)
    w_k[L:, :, n:] = torch.eye(R, dtype=dtype, device=device).unsqueeze(1)
    w_k = w_k.view(L + R, H * (n + R))
    # The CPU kernel wants values as wide as keys: zero columns in the value matrix widen them in the
    # same product, where padding its output would copy every expanded block once more.
    width = n + R if device.type == "cpu" else V
    w_v = torch.zeros(L, H, width, dtype=dtype, device=device)
    w_v[:, :, :V] = w_uv.permute(2, 0, 1)
    w_v = w_v.view(L, H * width)
    queries = q.to(dtype).transpose(1, 2)  # [B, H, Tq, n + R]
    attend = _attention_with_lse(device, dtype)

    def expanded(j0, j1):
        block = cache[:, j0:j1].to(dtype)
        k = (block @ w_k).view(B, j1 - j0, H, n + R).transpose(1, 2)
        v = (block[..., :L] @ w_v).view(B, j1 - j0, H, width).transpose(1, 2)
        return k, v

    out, lse = attend(queries, *expanded(q_start, q_start + Tq), True, scale)
    out = out.float()
    for j0 in range(0, q_start, key_block):
        lse = _merge(out, lse, *attend(queries, *expanded(j0, min(q_start, j0 + key_block)), False, scale))
    return out[..., :V].transpose(1, 2)


# The CPU's decode reads the cache this many bytes at a time: a block stays in the core's caches between
# the products that read it (4 MiB: 13,107 keys at the demo model's width, 3,640 at the 48B model's).
CPU_BLOCK_BYTES = 4 << 20


def mla_attention_cpu(q, cache, q_start, value_dim, scale, block=None):
    """The absorbed form on the CPU (decode, a short question): one pass over the cache in its own dtype,
    block by block, every (query, head) row at once (they all read the same keys).

    Each block of cached keys (before q_start, seen by every row) is read while it sits in the core's
    caches: its scores, then the weighted sum of its latents. The block's softmax is taken from its own
    maximum; the blocks' partial sums merge at the end by their maxima (the split-K rule). A float32
    cache (CPUs without bf16 hardware) takes our AVX2 kernel for up to avx2.MAX_ROWS rows where it runs
    (kernels/mla/avx2.py: one read of each key, the softmax online, parts of the keys merged by the same
    rule; a bfloat16 cache too, widened as it is read), else keys-major products ([n, D] @ [D, rows],
    which MKL runs faster than rows-major ones with a few rows; a bfloat16 cache under float32 queries
    widened a block at a time), and a bfloat16 model's cache _bf16_blocks's. The new tokens' own keys (a
    causal square, a few rows) are attended apart in float32 with their mask. No temporary is larger
    than a block's scores."""
    B, Tq, H, D = q.shape
    if Tq == 1 and block is None and avx2.takes(cache, value_dim, H):
        # One new token sees every key up to its own, which needs no mask: one call for all of them (q_start
        # may be a one-element tensor there, a recorded step's cache length: engine/cpu_replay.py).
        return avx2.attend_new_token(q.reshape(B, H, D), scale, cache, q_start, value_dim).reshape(B, 1, H, value_dim)
    rows = (q.float() * scale).reshape(B, Tq * H, D)  # query-major, head-minor
    # The new tokens' keys, masked: the first partial sum.
    keys = cache[:, q_start : q_start + Tq].float()  # [B, Tq, D]
    scores = rows @ keys.transpose(1, 2)  # [B, Tq * H, Tq]
    key_pos = torch.arange(Tq, device=q.device)
    row_pos = torch.arange(Tq, device=q.device).repeat_interleave(H)
    scores.masked_fill_(key_pos[None, :] > row_pos[:, None], float("-inf"))
    maxima, sums, partials = _block_softmax(scores, keys[..., :value_dim])
    if q_start and block is None and avx2.takes(cache, value_dim, Tq * H):
        cached = avx2.attend_cached(rows, cache, q_start, value_dim)
        maxima, sums, partials = (torch.cat([a[None], b]) for a, b in zip((maxima, sums, partials), cached))
    elif q_start:
        block = block or max(1, CPU_BLOCK_BYTES // (D * cache.element_size()))
        blocks = -(-q_start // block)
        maxima = torch.cat([maxima[None], maxima.new_empty(blocks, *maxima.shape)])  # [1 + blocks, B, rows]
        sums = torch.cat([sums[None], sums.new_empty(blocks, *sums.shape)])
        partials = torch.cat([partials[None], partials.new_empty(blocks, *partials.shape)])
        if torch.float32 in (cache.dtype, q.dtype):
            scores = torch.empty(block, Tq * H, device=q.device)
            for b, i, j0 in ((b, i, j0) for b in range(B) for i, j0 in enumerate(range(0, q_start, block), start=1)):
                keys = cache[b, j0 : min(q_start, j0 + block)].float()
                s = scores[: keys.shape[0]]
                torch.mm(keys, rows[b].t(), out=s)
                torch.amax(s, 0, out=maxima[i, b])
                s.sub_(maxima[i, b]).exp_()
                torch.sum(s, 0, out=sums[i, b])
                torch.mm(s.t(), keys[:, :value_dim], out=partials[i, b])
        else:
            _bf16_blocks(rows.to(cache.dtype), cache, q_start, value_dim, block, maxima, sums, partials)
    else:
        maxima, sums, partials = maxima[None], sums[None], partials[None]
    return _merged(maxima, sums, partials).reshape(B, Tq, H, value_dim)


def _merged(maxima, sums, partials):
    """Partial softmax sums, each relative to its part's maximum (maxima, sums [parts, B, rows], partials
    [parts, B, rows, V]), merged by the split-K rule: [B, rows, V]."""
    weights = (maxima - maxima.amax(0)).exp_()  # [parts, B, rows]
    return (partials * weights.unsqueeze(-1)).sum(0) / (sums * weights).sum(0).unsqueeze(-1)


def _bf16_blocks(rows_c, cache, q_start, value_dim, block, maxima, sums, partials):
    """mla_attention_cpu's cached blocks in half precision, into maxima, sums and partials [1 + blocks,
    B, ...] from index 1. On the CPU a bf16 product returns bf16, which would round every score to 8
    bits (an error of 0.4% of the score, more than the softmax forgives); a remainder product subtracts
    the rounded scores before its own rounding (its input is added in float32), so the two bf16 halves
    sum to the float32 score. The block's weights, rounded to the cache's dtype, weight its latents."""
    B, R = rows_c.shape[:2]
    # Flat scratch, each block's [R, n] a contiguous view: products never write into strided outputs
    # (a bf16 product into a strided `out=` once left NaN in a full test run on an AMX CPU).
    scores_hi = torch.empty(R * block, dtype=cache.dtype, device=cache.device)
    scores_lo, weights = torch.empty_like(scores_hi), torch.empty_like(scores_hi)
    scores = torch.empty(R * block, device=cache.device)
    # Two-dimensional products on views: a batched product copies a batch's strided view first.
    for b, i, j0 in ((b, i, j0) for b in range(B) for i, j0 in enumerate(range(0, q_start, block), start=1)):
        keys = cache[b, j0 : min(q_start, j0 + block)]  # [n, D], a view of the cache as it lies
        n = keys.shape[0]
        hi, lo, s, p = (t[: R * n].view(R, n) for t in (scores_hi, scores_lo, scores, weights))
        torch.mm(rows_c[b], keys.t(), out=hi)
        torch.addmm(hi, rows_c[b], keys.t(), beta=-1, out=lo)  # rows . keys - hi, rounded once
        s.copy_(hi).add_(lo)
        torch.amax(s, -1, out=maxima[i, b])
        s.sub_(maxima[i, b].unsqueeze(-1)).exp_()
        torch.sum(s, -1, out=sums[i, b])
        p.copy_(s)
        partials[i, b] = p @ keys[:, :value_dim]


def _block_softmax(scores, values):
    """A block's share of attention, float32: its maxima [B, rows], the sums of its weights relative to
    them [B, rows] and the weighted sums of its values [B, rows, V]."""
    maxima = scores.amax(-1)
    p = (scores - maxima.unsqueeze(-1)).exp_()
    return maxima, p.sum(-1), p @ values


def _merge(out, lse, block_out, block_lse):
    """Fold a block's normalised output and log-sum-exp into the running ones (out in place, float32);
    returns the new log-sum-exp."""
    merged = torch.logaddexp(lse, block_lse)
    out.mul_((lse - merged).exp_().unsqueeze(-1))
    out.add_(block_out.float() * (block_lse - merged).exp_().unsqueeze(-1))
    return merged


def _attention_with_lse(device, dtype):
    """attend(q [B, H, Tq, D], k [B, H, Tk, D], v [B, H, Tk, V], causal, scale) -> (out [B, H, Tq, V],
    natural log-sum-exp of the scaled scores [B, H, Tq] float32); `causal` for Tq == Tk only.

    On CUDA in bf16 or fp16, cuDNN's fused attention: on an H100 (2026-11-27,
    packaging/bench/gpu_checks/mla_prefill_sdpa.py) 630 TFLOP/s with the values 128 wide, against 277 for the
    flash attention kernel PyTorch picks by default, which also wants the values padded to the keys' 192.
    A GPU or build without cuDNN's takes that flash kernel. float32 on CUDA (checks; neither kernel takes
    it) takes the memory-efficient kernel. The CPU takes PyTorch's flash kernel for the CPU: blocked, the
    softmax fused with the products, float32 accumulation, no score matrix in memory."""
    if device.type != "cuda":
        return _cpu_flash_attention
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


def _cpu_flash_attention(q, k, v, causal, scale):
    V = v.shape[-1]
    if V < q.shape[-1]:
        v = torch.nn.functional.pad(v, (0, q.shape[-1] - V))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out[..., :V], lse


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
            _cudnn_works[key] = bool(
                torch.allclose(out.float(), want, atol=2e-2) and torch.allclose(lse, want_lse, atol=2e-2)
            )
        except RuntimeError:
            _cudnn_works[key] = False
    return _cudnn_works[key]
