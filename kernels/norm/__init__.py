"""RMS norms over the last axis: `rms_norm(x, weight, eps)` (the model's norms),
`add_rms_norm(residual, delta, weight, eps)` -> (residual + delta, its norm) (a block's residual add and
the next norm, in one launch on CUDA) and `gated_rms_norm(x, gate, weight, eps)` (the KDA output norm,
times sigmoid(gate)).

The formulas, with their casts, are naive.py's. On CUDA one Triton launch per call replaces the
seven to eleven elementwise launches of the PyTorch form, which dominate a decode step's launch count;
on an AVX2 CPU one C call (avx2.py) replaces as many operators.
The Triton kernel lives in fused.py: a submodule named like the function would replace it in this
package's namespace once imported.
"""

from kimi_desk.kernels import use_triton
from kimi_desk.kernels.norm import avx2
from kimi_desk.kernels.norm.naive import gated_rms_norm_torch, rms_norm_torch

__all__ = ["add_rms_norm", "gated_rms_norm", "rms_norm"]


def rms_norm(x, weight, eps):
    if use_triton(x):
        from kimi_desk.kernels.norm.fused import rms_norm_triton

        return rms_norm_triton(x, weight, eps)
    if avx2.takes(x, weight):
        return avx2.rms_norm_avx2(x, weight, eps)
    return rms_norm_torch(x, weight, eps)


def add_rms_norm(residual, delta, weight, eps):
    if use_triton(residual) and delta.dtype == residual.dtype:
        from kimi_desk.kernels.norm.fused import rms_norm_triton

        return rms_norm_triton(residual, weight, eps, delta=delta)
    if not use_triton(residual) and avx2.takes(residual, weight, delta):
        return avx2.rms_norm_avx2(residual, weight, eps, delta)
    summed = residual + delta
    return summed, rms_norm_torch(summed, weight, eps)


def gated_rms_norm(x, gate, weight, eps):
    if use_triton(x):
        from kimi_desk.kernels.norm.fused import rms_norm_triton

        return rms_norm_triton(x, weight, eps, gate=gate)
    return gated_rms_norm_torch(x, gate, weight, eps)
