"""Kimi Delta Attention: `chunk_kda` for prefill, `fused_recurrent_kda` for decode.

Both take q, k [B, T, H, K] (already L2-normalised), v [B, T, H, V], g [B, T, H, K] (log decay, fp32),
beta [B, T, H] and an optional fp32 state [B, H, K, V]; both return (o [B, T, H, V], final state or
None). CUDA tensors go to Triton; everything else, or any tensor when KIMI_DESK_KERNELS=torch, to the
PyTorch implementations in naive.py, the chunked form's within-chunk matrices and the other inputs of
its products made in C on an AVX2 CPU (avx2.py's chunk_inputs). `recurrent_kda_inplace` is the CPU
decode step: the recurrence with the state advanced in place.

`prepare_kda` turns the layer's raw projections into those inputs in one pass: q and k L2-normalised,
g = -exp(A_log) * softplus(x + dt_bias), beta = sigmoid(logits) (Triton's prepare.py or naive.py's
reference, dispatched the same way). engine/kda.py's prefill is `prepare_kda` then `kda`, on every device.

The decode step on the GPU reads the raw projections instead (the gate's input with A_log and dt_bias, q
and k before their L2 norm, beta's logits): `fused_recurrent.fused_recurrent_kda_triton`'s fused flags,
which engine/kda.py calls directly.
"""

from __future__ import annotations

from kimi_desk.kernels import use_triton
from kimi_desk.kernels.kda import avx2
from kimi_desk.kernels.kda.naive import chunk_kda_torch, prepare_kda_torch, recurrent_kda, recurrent_kda_inplace

__all__ = ["chunk_kda", "fused_recurrent_kda", "kda", "prepare_kda", "recurrent_kda_inplace"]

# Below this many tokens the step-by-step recurrence beats the chunked form on the CPU (and fla makes
# the same choice at 64).
RECURRENT_MAX_TOKENS = 16


def chunk_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    if use_triton(q):
        from kimi_desk.kernels.kda.chunk import chunk_kda_triton

        return chunk_kda_triton(q, k, v, g, beta, scale, initial_state, output_final_state)
    inputs = avx2.chunk_inputs if avx2.chunk_takes(q) else None
    return chunk_kda_torch(q, k, v, g, beta, scale, initial_state, output_final_state, inputs=inputs)


def fused_recurrent_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    if use_triton(q):
        from kimi_desk.kernels.kda.fused_recurrent import fused_recurrent_kda_triton

        return fused_recurrent_kda_triton(q, k, v, g, beta, scale, initial_state, output_final_state)
    return recurrent_kda(q, k, v, g, beta, scale, initial_state, output_final_state)


def prepare_kda(q, k, x, A_log, dt_bias, beta_logits):
    """(q, k, g, beta) for chunk_kda from the raw q, k [B, T, H, K], the gate input x [B, T, H, K] with
    A_log [H] and dt_bias [H * K], and beta's logits [B, T, H]."""
    if use_triton(q):
        from kimi_desk.kernels.kda.prepare import prepare_kda_triton

        return prepare_kda_triton(q, k, x, A_log, dt_bias, beta_logits)
    return prepare_kda_torch(q, k, x, A_log, dt_bias, beta_logits)


def kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """The chunked or the recurrent form, chosen by sequence length."""
    fn = fused_recurrent_kda if q.shape[1] <= RECURRENT_MAX_TOKENS else chunk_kda
    return fn(q, k, v, g, beta, scale, initial_state, output_final_state)
