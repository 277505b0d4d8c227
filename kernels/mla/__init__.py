"""Multi-head Latent Attention over the compressed cache.

The cache [B, Tk, L + R] holds per token the normalised latent c (L values) followed by the shared
key part k_r (R values). Query i sits at position q_start + i and sees keys 0 .. q_start + i.

`mla_attention(q, cache, q_start, value_dim, scale)`, the decode form: q [B, Tq, H, L + R] are
absorbed queries [W_UK^T q_nope ‖ q_rope], so every head reads the same keys (MQA) and the value of a
key is its latent c (`value_dim` = L). Returns the attended latent [B, Tq, H, L] in float32. The cache
may be longer than q_start + Tq (a preallocated buffer): rows past the last query are never read, and
need not hold finite values. On the Triton path q_start may be a one-element device tensor.

`mla_prefill(q, cache, w_uk, w_uv, q_start, scale)`, the prefill form: q [B, Tq, H, n + R] are plain
queries [q_nope ‖ q_rope]; keys and values are expanded from the latents through w_uk [H, n, L] and
w_uv [H, v, L]. Returns the attention output [B, Tq, H, v] in float32.

On CUDA, the absorbed form runs the split-K Triton kernel of decode.py (one pass over the cache, every
head at once; its memory is the output and small partials at any cache length). The model sends it
fewer than 64 queries (decode, a question after a document); at 16 queries it takes about 8 one-query
passes' time. KIMI_DESK_KERNELS=torch takes PyTorch's GPU operations instead (one pass over the cache,
scores for every key: 8 GB for 63 queries over 1M tokens). The prefill form runs cuDNN's fused
attention on key blocks expanded from the latents (torch_attention.mla_prefill_sdpa: memory bounded
at any cache length). On the CPU the absorbed form reads the cache once, block by block, with float32
scores from bf16 products (torch_attention.mla_attention_cpu); the prefill form runs PyTorch's flash
kernel for the CPU key block by key block. Memory stays bounded at any context length.

Around the decode form: `absorb_queries` (q_nope through W_UK beside q_rope), `values` (the attended
latents through W_UV) and `fused_latents_writer` (the new tokens' normed latents written into the
cache's rows) each take one Triton launch on CUDA (absorbed.py), where their PyTorch forms
(torch_attention.py) widen kv_b_proj's weight to float32 and take five, two and three launches. On the
CPU the first two read kv_b_proj's weight as stored, bfloat16 or float32 (avx2.py): the PyTorch forms
multiply a float32 copy of a bfloat16 weight, kept between steps, twice the bytes a step reads (16 MB a
layer at the 48B shapes), and take an einsum each.

An absorbed prefill (attention straight over the latents) is not used: it costs 1088 multiply-adds per
query, key and head against the expanded form's 320.
"""

from kimi_desk.kernels import use_triton
from kimi_desk.kernels.mla import avx2
from kimi_desk.kernels.mla.torch_attention import (
    absorb_queries_torch,
    mla_attention_cpu,
    mla_attention_dense,
    mla_prefill_sdpa,
    values_torch,
)
from kimi_desk.kernels.norm import avx2 as norm_avx2

__all__ = ["absorb_queries", "fused_latents_writer", "mla_attention", "mla_prefill", "values"]


def absorb_queries(q, kv_b_weight, nope_dim, v_dim, cache_dtype):
    """The decode form's queries [W_UK^T q_nope ‖ q_rope] [B, T, H, L + R] from q [B, T, H, n + R] and
    kv_b_proj's weight [H * (n + v), L], as `mla_attention` on a cache of cache_dtype reads them: on the
    Triton path in one launch, rounded to the attention kernel's operand dtype; else float32."""
    if use_triton(q):
        from kimi_desk.kernels.mla.absorbed import absorb_queries_triton
        from kimi_desk.kernels.mla.decode import operand_torch_dtype

        return absorb_queries_triton(q, kv_b_weight, nope_dim, v_dim, operand_torch_dtype(cache_dtype))
    if avx2.reads_weight(kv_b_weight, v_dim):
        return avx2.absorb_queries_avx2(q, kv_b_weight, nope_dim, v_dim)
    return absorb_queries_torch(q, kv_b_weight, nope_dim, v_dim)


def values(attended, kv_b_weight, nope_dim, v_dim, out_dtype):
    """The attended latents [B, T, H, L] (float32) through W_UV: [B, T, H, v] in out_dtype."""
    if use_triton(attended):
        from kimi_desk.kernels.mla.absorbed import values_triton

        return values_triton(attended, kv_b_weight, nope_dim, v_dim, out_dtype)
    if avx2.reads_weight(kv_b_weight, v_dim):
        return avx2.values_avx2(attended, kv_b_weight, nope_dim, v_dim).to(out_dtype)
    return values_torch(attended, kv_b_weight, nope_dim, v_dim, out_dtype)


def fused_latents_writer(ckv, norm_weight, eps, cache_dtype):
    """A `write(buffer, start)` for MLACache.append_written that computes the latents [rms_norm(c) ‖ k_r]
    of the joined projection's output ckv [B, T, L + R] straight into the cache's rows (kernels/norm's
    arithmetic): one launch on the Triton path, one C call a sequence on an AVX2 CPU with the cache in
    ckv's dtype; None elsewhere (the caller norms and appends)."""
    if not use_triton(ckv):
        if not norm_avx2.takes_latents(ckv, norm_weight, cache_dtype):
            return None
        return lambda buffer, start: norm_avx2.latents_into(ckv, norm_weight, eps, buffer, start)
    from kimi_desk.kernels.mla.absorbed import latents_into_triton

    return lambda buffer, start: latents_into_triton(ckv, norm_weight, eps, buffer, start)


def mla_attention(q, cache, q_start, value_dim, scale):
    # Imported here: Triton is only loaded when a CUDA tensor asks for it.
    if use_triton(q):
        from kimi_desk.kernels.mla.decode import mla_decode

        return mla_decode(q, cache, q_start, value_dim, scale)
    if not q.is_cuda:
        return mla_attention_cpu(q, cache, q_start, value_dim, scale)
    # The GPU's PyTorch form reads every row it is given.
    return mla_attention_dense(q, cache[:, : q_start + q.shape[1]], q_start, value_dim, scale)


def mla_prefill(q, cache, w_uk, w_uv, q_start, scale):
    return mla_prefill_sdpa(q, cache, w_uk, w_uv, q_start, scale)
