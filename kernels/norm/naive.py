"""RMS norms in PyTorch: the CPU path and the reference for the Triton kernels."""

from __future__ import annotations

import torch


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama style: normalise in fp32, cast back to x's dtype, then scale (no 1 + weight offset)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def gated_rms_norm_torch(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """fla's FusedRMSNormGated with a sigmoid gate: everything in fp32, the result in x's dtype."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * weight.float() * torch.sigmoid(gate.float())).to(x.dtype)
