"""Load-time fusion of the projections that read the same input: one matrix product per group.

A decode step multiplies one token by every projection; on a GPU each product is a launch whose fixed
cost rivals its work for the small matrices (the KDA gate's low-rank halves are 128 x 2304, beta's
32 x 2304). Joined along their output rows, the products of a group become one launch over a taller
matrix, and its output is split back into views. Per group:

- KDA: q, k, v, the forget gate's and the output gate's first (low-rank) halves, and beta: six into one;
  and the gates' second halves, which read different inputs (the two low-rank outputs, side by side in
  the first product's output): one block-diagonal product (`BlockDiagonalLinear`; its zero blocks add
  exact zeros and 1 MB per layer at the 48B shapes, and save a launch).
- MLA: q and the latent projection `kv_a_proj_with_mqa`: two into one.
- The dense MLP (and a shared expert that is not folded, below): gate and up: two into one.

Joining rows changes no product (each output element is the same dot product) and, for fp8 weights,
no scale (they are per output row). The model's modules check for their joined projection and use it
when present (model.py, kda.py); the separate ones are removed, so no memory is held twice. A fused
model keeps the checkpoint's numbers but not its names: it is not saved (weights.save_checkpoint).

The shared expert of a MoE layer joins the routed experts too (`fold_shared_expert`): stacked as expert
E, which the router appends to every token's choice with weight 1, it runs inside the routed experts'
kernels (two launches per layer for all nine experts of a decode step, where it took five more of its
own: gate/up, SiLU, product, down, the add). It needs the shared expert's width to equal a routed
expert's (one shared expert, as in Kimi Linear); otherwise it stays apart. The sum over experts then
takes the shared expert's output in float32 with the routed ones, before one rounding to the model's
dtype (it was rounded, then added).
"""

from __future__ import annotations

import torch
from torch import nn

from kimi_desk.engine.kda import KimiDeltaAttention
from kimi_desk.engine.model import MLP, MultiHeadLatentAttention, SparseMoE
from kimi_desk.engine.quantize import Fp8Linear
from kimi_desk.kernels.quant import FP8

# Module class -> (attribute of the joined projection, the projections it joins, in output order).
GROUPS = {
    KimiDeltaAttention: ("in_proj", ("q_proj", "k_proj", "v_proj", "f_a_proj", "g_a_proj", "b_proj")),
    MultiHeadLatentAttention: ("in_proj", ("q_proj", "kv_a_proj_with_mqa")),
    MLP: ("gate_up_proj", ("gate_proj", "up_proj")),
}


class _SplitLinear(nn.Module):
    """One bias-free linear map standing for several (`parts`, fp8 or not alike), its output split back
    into theirs (views of one product)."""

    def __init__(self, parts: list[nn.Module], weight: torch.Tensor):
        super().__init__()
        self.sizes = [part.weight.shape[0] for part in parts]
        if all(isinstance(part, Fp8Linear) for part in parts):
            self.inner = Fp8Linear(weight.shape[1], weight.shape[0], device="meta")
            self.inner.weight_scale = torch.cat([part.weight_scale for part in parts])
        else:
            assert all(isinstance(part, nn.Linear) and part.bias is None for part in parts)
            self.inner = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        self.inner.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.inner(x).split(self.sizes, dim=-1)


class FusedLinear(_SplitLinear):
    """Several bias-free linear maps of one input, their weights stacked by rows."""

    def __init__(self, parts: list[nn.Module]):
        assert all(part.weight.shape[1] == parts[0].weight.shape[1] for part in parts)
        super().__init__(parts, _cat_rows([part.weight.data for part in parts]))


class BlockDiagonalLinear(_SplitLinear):
    """Several bias-free linear maps of adjacent slices of one input: y = x @ blockdiag(W_1, W_2, ...)^T."""

    def __init__(self, parts: list[nn.Module]):
        widths = [part.weight.shape[1] for part in parts]
        first = parts[0].weight
        # Built as bytes for fp8 (zero bytes are fp8 +0; slice assignment of float8 is not implemented
        # everywhere).
        raw = torch.uint8 if first.dtype == FP8 else first.dtype
        storage = torch.zeros(sum(p.weight.shape[0] for p in parts), sum(widths), dtype=raw, device=first.device)
        row = col = 0
        for part in parts:
            block = part.weight.data.view(raw)
            storage[row : row + block.shape[0], col : col + block.shape[1]] = block
            row, col = row + block.shape[0], col + block.shape[1]
        super().__init__(parts, storage.view(first.dtype))
        self.widths = widths


def _cat_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    if tensors[0].dtype == FP8:  # through bytes: concatenation of float8 tensors is not implemented everywhere
        return torch.cat([t.view(torch.uint8) for t in tensors]).view(FP8)
    return torch.cat(tensors)


def fold_shared_expert(moe: SparseMoE) -> None:
    """Stack the shared expert as routed expert E and have the router append it to every choice (see the
    module doc). One layer at a time, so the copy of the stacked weights is one layer's."""
    shared, experts = moe.shared_experts, moe.experts
    if shared is None or shared.gate_up_proj is not None or shared.gate_proj.weight.shape != experts.w1.shape[1:]:
        return
    E = experts.w1.shape[0]
    for attribute, part in (("w1", shared.gate_proj), ("w2", shared.down_proj), ("w3", shared.up_proj)):
        stacked = getattr(experts, attribute).data
        setattr(experts, attribute, nn.Parameter(_cat_rows([stacked, part.weight.data[None]]), requires_grad=False))
        if isinstance(part, Fp8Linear):
            scale = experts.get_buffer(f"{attribute}_scale")
            setattr(experts, f"{attribute}_scale", torch.cat([scale, part.weight_scale[None]]))
    moe.shared_experts = None
    moe.gate.shared_expert = E


def fuse_projections(model: nn.Module) -> nn.Module:
    """Join each group's projections in place (see the module doc); returns the model."""
    for module in model.modules():
        if isinstance(module, SparseMoE):
            fold_shared_expert(module)
    for module in model.modules():
        for cls, (attribute, names) in GROUPS.items():
            if isinstance(module, cls) and getattr(module, attribute) is None:
                joined = FusedLinear([getattr(module, name) for name in names])
                if cls is KimiDeltaAttention:
                    # The gates' low-rank outputs as one slice, the input of their joined second halves.
                    joined.sizes[3:5] = [joined.sizes[3] + joined.sizes[4]]
                    module.gates_b_proj = BlockDiagonalLinear([module.f_b_proj, module.g_b_proj])
                    del module.f_b_proj, module.g_b_proj
                setattr(module, attribute, joined)
                for name in names:
                    delattr(module, name)
    model.fused = True
    return model
