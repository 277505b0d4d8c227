"""Weight-only fp8 (float8_e4m3fn) in PyTorch: one scale per output row.

A weight matrix W [..., O, D] is stored as Q = round_fp8(W / s) with s [..., O] = max_d |W[..., o, d]| / 448
(448 is e4m3's largest finite value), so every row uses the format's whole range. W is approximated by
Q * s[..., None]; a linear layer computes y = x @ (Q * s)^T, with the products taken on the dequantized
weights. Rows of zeros get s = 1 (Q = 0), never a division by zero.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_fp8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [..., O, D] -> (Q [..., O, D] float8_e4m3fn, s [..., O] float32)."""
    w = weight.float()
    amax = w.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize_fp8_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(Q, s) -> Q * s[..., None] in `dtype` (the product in float32, then rounded once)."""
    return (q.float() * scale[..., None].float()).to(dtype)


def fp8_linear_torch(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., D] @ dequant(Q, s)^T -> [..., O] in x's dtype. The weight is dequantized straight into x's
    dtype (e4m3 is exact in it; the product with the float32 scale is rounded once, as
    dequantize_fp8_rows does): one copy of 2 bytes a weight for bf16, where going through float32 moved
    about 20. Scaling the output instead would write a float32 [tokens, O] product per call, more bytes
    than the weight at prefill's chunk sizes."""
    weight = q.to(x.dtype)
    weight.mul_(scale[:, None])
    return torch.nn.functional.linear(x, weight)
