"""Kimi Linear's forget gate inside the KDA kernels that read the raw projection (the prefill's prepass,
prepare.py, and the fused decode step, fused_recurrent.py): g = -exp(A_log) * softplus(x + dt_bias), not
bounded below."""

import triton
import triton.language as tl


@triton.jit
def log_decay(b_x, b_A):
    """b_A * softplus(b_x), with b_x = x + dt_bias and b_A = -exp(A_log). softplus with fla's threshold:
    linear above 20, where log(1 + e^x) == x in fp32 anyway."""
    return b_A * tl.where(b_x > 20.0, b_x, tl.log(1.0 + tl.exp(tl.minimum(b_x, 20.0))))
