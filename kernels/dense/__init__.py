"""Products with unquantized weights: `linear(x, weight)` is F.linear(x, weight) (no bias), a few rows
against a bfloat16 weight on an AVX2 CPU through one call of C (bf16_cpu.py), everything else through
PyTorch."""

import torch.nn.functional as F

from kimi_desk.kernels.dense import bf16_cpu

__all__ = ["linear"]


def linear(x, weight):
    if x.device.type == "cpu" and bf16_cpu.takes(x, weight):
        return bf16_cpu.bf16_linear(x, weight)
    return F.linear(x, weight)
