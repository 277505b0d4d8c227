"""Load-time fusion of the projections that read the same input: one matrix product per group.

A decode step multiplies one token by every projection; on a GPU each product is a launch whose fixed
cost rivals its work for the small matrices (the KDA gate's low-rank halves are 128 x 2304, beta's
32 x 2304). Joined along their output rows, the products of a group become one launch over a taller
matrix, and its output is split back into views. Per group:

- KDA: q, k, v, the forget gate's and the output gate's first (low-rank) halves, and beta: six into one.
- MLA: q and the latent projection `kv_a_proj_with_mqa`: two into one.
- The dense MLP and the shared experts: gate and up: two into one.

Joining rows changes no product (each output element is the same dot product) and, for fp8 weights,
no scale (they are per output row). The model's modules check for their joined projection and use it
when present (model.py, kda.py); the separate ones are removed, so no memory is held twice. A fused
model keeps the checkpoint's numbers but not its names: it is not saved (weights.save_checkpoint).
"""

from __future__ import annotations

import torch
from torch import nn

from kimi_desk.engine.kda import KimiDeltaAttention
from kimi_desk.engine.model import MLP, MultiHeadLatentAttention
from kimi_desk.engine.quantize import Fp8Linear
from kimi_desk.kernels.quant import FP8

# Module class -> (attribute of the joined projection, the projections it joins, in output order).
GROUPS = {
    KimiDeltaAttention: ("in_proj", ("q_proj", "k_proj", "v_proj", "f_a_proj", "g_a_proj", "b_proj")),
    MultiHeadLatentAttention: ("in_proj", ("q_proj", "kv_a_proj_with_mqa")),
    MLP: ("gate_up_proj", ("gate_proj", "up_proj")),
}


class FusedLinear(nn.Module):
    """Several bias-free linear maps of one input, their weights stacked by rows: returns the tuple of
    their outputs (views of one product)."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.sizes = [part.weight.shape[0] for part in parts]
        in_features = parts[0].weight.shape[1]
        assert all(part.weight.shape[1] == in_features for part in parts)
        if all(isinstance(part, Fp8Linear) for part in parts):
            self.inner = Fp8Linear(in_features, sum(self.sizes), device="meta")
            # Through bytes: concatenation of float8 tensors is not implemented everywhere.
            weight = torch.cat([part.weight.data.view(torch.uint8) for part in parts]).view(FP8)
            self.inner.weight = nn.Parameter(weight, requires_grad=False)
            self.inner.weight_scale = torch.cat([part.weight_scale for part in parts])
        else:
            assert all(isinstance(part, nn.Linear) and part.bias is None for part in parts)
            self.inner = nn.Linear(in_features, sum(self.sizes), bias=False, device="meta")
            self.inner.weight = nn.Parameter(torch.cat([part.weight.data for part in parts]), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.inner(x).split(self.sizes, dim=-1)


def fuse_projections(model: nn.Module) -> nn.Module:
    """Join each group's projections in place (see the module doc); returns the model."""
    for module in model.modules():
        for cls, (attribute, names) in GROUPS.items():
            if isinstance(module, cls) and getattr(module, attribute) is None:
                setattr(module, attribute, FusedLinear([getattr(module, name) for name in names]))
                for name in names:
                    delattr(module, name)
    model.fused = True
    return model
