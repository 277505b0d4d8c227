"""The model's bias-free linear maps in their checkpoint dtype: nn.Linear (same parameters, same names),
the product taken by kernels/dense's `linear`, which gives a few rows against a bfloat16 weight on the
CPU (a decode step) one call of C instead of a oneDNN product."""

from __future__ import annotations

import torch
from torch import nn

from kimi_desk.kernels.dense import linear


class Linear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)
