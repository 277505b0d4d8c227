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
from kimi_desk.engine.linear import Linear
from kimi_desk.engine.model import MLP, MultiHeadLatentAttention, SparseMoE
from kimi_desk.engine.quantize import Int4Linear, RowScaledLinear
from kimi_desk.kernels.quant import FP8

# Module class -> (attribute of the joined projection, the projections it joins, in output order).
GROUPS = {
    KimiDeltaAttention: ("in_proj", ("q_proj", "k_proj", "v_proj", "f_a_proj", "g_a_proj", "b_proj")),
    MultiHeadLatentAttention: ("in_proj", ("q_proj", "kv_a_proj_with_mqa")),
    MLP: ("gate_up_proj", ("gate_proj", "up_proj")),
}


class _SplitLinear(nn.Module):
    """One bias-free linear map standing for several (`parts`, all stored alike: plain, fp8 or int8 rows,
    or int4 groups), its output split back into theirs (views of one product)."""

    def __init__(self, parts: list[nn.Module], weight: torch.Tensor):
        super().__init__()
        self.sizes = [part.out_features if hasattr(part, "out_features") else part.weight.shape[0] for part in parts]
        kinds = {_kind(part) for part in parts}
        assert len(kinds) == 1, f"cannot join projections stored as {sorted(kinds)}"
        first = parts[0]
        in_features, out_features = first.in_features, sum(self.sizes)
        if isinstance(first, Int4Linear):
            self.inner = Int4Linear(in_features, out_features, device="meta")
            self.inner.weight_zero = torch.cat([part.weight_zero for part in parts])
            self.inner.weight_scale = torch.cat([part.weight_scale for part in parts])
        elif isinstance(first, RowScaledLinear):
            self.inner = RowScaledLinear(in_features, out_features, first.weight.dtype, device="meta")
            self.inner.weight_scale = torch.cat([part.weight_scale for part in parts])
        else:
            self.inner = Linear(in_features, out_features, device="meta")
        self.inner.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.inner(x).split(self.sizes, dim=-1)

    def join_outputs(self, first: int) -> None:
        """Hand outputs `first` and `first + 1` back as one slice."""
        self.sizes[first : first + 2] = [self.sizes[first] + self.sizes[first + 1]]


def _kind(module: nn.Module) -> str:
    if isinstance(module, Int4Linear):
        return f"int4/{module.weight_scale.shape[-1]}"
    if isinstance(module, RowScaledLinear):
        return str(module.weight.dtype)
    assert isinstance(module, nn.Linear) and module.bias is None, type(module)
    return "plain"


class _JoinedByKind(nn.Module):
    """Several bias-free linear maps of one input stored in different formats (int4 with int8 gates):
    one joined product per format, the outputs handed back in the parts' order."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        kinds = [_kind(part) for part in parts]
        order = list(dict.fromkeys(kinds))
        self.joined = nn.ModuleList(FusedLinear([p for p, k in zip(parts, kinds) if k == kind]) for kind in order)
        # For each part: (which joined product, which of its outputs).
        counters = dict.fromkeys(order, 0)
        self.places = []
        for kind in kinds:
            self.places.append((order.index(kind), counters[kind]))
            counters[kind] += 1
        self.sizes = [part.out_features for part in parts]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = [joined(x) for joined in self.joined]
        return tuple(outputs[i][j] for i, j in self.places)

    def join_outputs(self, first: int) -> None:
        """Hand outputs `first` and `first + 1` back as one slice (they must be stored alike)."""
        (i, j), (i2, j2) = self.places[first], self.places[first + 1]
        assert i == i2 and j2 == j + 1, "only outputs of one joined product can be handed back as one"
        self.joined[i].join_outputs(j)
        del self.places[first + 1]
        self.places = [(a, b - 1 if a == i and b > j else b) for a, b in self.places]
        self.sizes[first : first + 2] = [self.sizes[first] + self.sizes[first + 1]]


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
        assert first.dtype != torch.uint8, "int4 projections are not joined block-diagonally"
        raw = torch.uint8 if first.dtype == FP8 else first.dtype
        storage = torch.zeros(sum(p.weight.shape[0] for p in parts), sum(widths), dtype=raw, device=first.device)
        row = col = 0
        for part in parts:
            block = part.weight.data.view(raw)
            storage[row : row + block.shape[0], col : col + block.shape[1]] = block
            row, col = row + block.shape[0], col + block.shape[1]
        super().__init__(parts, storage.view(first.dtype))
        self.widths = widths


def join_projections(parts: list[nn.Module]) -> nn.Module:
    """FusedLinear when the parts are stored alike, else one joined product per format."""
    if len({_kind(part) for part in parts}) == 1:
        return FusedLinear(parts)
    return _JoinedByKind(parts)


def _cat_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    if tensors[0].dtype == FP8:  # through bytes: concatenation of float8 tensors is not implemented everywhere
        return torch.cat([t.view(torch.uint8) for t in tensors]).view(FP8)
    return torch.cat(tensors)


def fold_shared_expert(moe: SparseMoE) -> None:
    """Stack the shared expert as routed expert E and have the router append it to every choice (see the
    module doc). One layer at a time, so the copy of the stacked weights is one layer's."""
    shared, experts = moe.shared_experts, moe.experts
    if (
        shared is None
        or not hasattr(experts, "w1")
        or shared.gate_up_proj is not None
        or shared.gate_proj.weight.shape != experts.w1.shape[1:]
        or _kind(shared.gate_proj) != _kind_of_experts(experts)
    ):
        return
    E = experts.w1.shape[0]
    for attribute, part in (("w1", shared.gate_proj), ("w2", shared.down_proj), ("w3", shared.up_proj)):
        stacked = getattr(experts, attribute).data
        setattr(experts, attribute, nn.Parameter(_cat_rows([stacked, part.weight.data[None]]), requires_grad=False))
        for sidecar in ("scale", "zero"):
            if hasattr(part, f"weight_{sidecar}"):
                joined = torch.cat(
                    [experts.get_buffer(f"{attribute}_{sidecar}"), getattr(part, f"weight_{sidecar}")[None]]
                )
                setattr(experts, f"{attribute}_{sidecar}", joined)
    moe.shared_experts = None
    moe.gate.shared_expert = E


def _kind_of_experts(experts: nn.Module) -> str:
    if hasattr(experts, "w1_zero"):
        return f"int4/{experts.w1_zero.shape[-1]}"
    return str(experts.w1.dtype) if hasattr(experts, "w1_scale") else "plain"


def fuse_projections(model: nn.Module) -> nn.Module:
    """Join each group's projections in place (see the module doc); returns the model."""
    for module in model.modules():
        if isinstance(module, SparseMoE):
            fold_shared_expert(module)
    for module in model.modules():
        for cls, (attribute, names) in GROUPS.items():
            if isinstance(module, cls) and getattr(module, attribute) is None:
                joined = join_projections([getattr(module, name) for name in names])
                if cls is KimiDeltaAttention:
                    # The gates' low-rank outputs as one slice, the input of their joined second halves.
                    joined.join_outputs(3)
                    module.gates_b_proj = BlockDiagonalLinear([module.f_b_proj, module.g_b_proj])
                    del module.f_b_proj, module.g_b_proj
                setattr(module, attribute, joined)
                for name in names:
                    delattr(module, name)
    model.fused = True
    return model
