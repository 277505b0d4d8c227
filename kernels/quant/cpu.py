"""int4 products on the CPU through PyTorch's weight-only int4 operator.

`torch.ops.aten._weight_int4pack_mm_for_cpu` multiplies bf16 rows by an int4 weight in its own tiled
layout, unpacking in registers (AVX-512 / AVX2 kernels): a one-token product reads half a byte per
weight where a bf16 weight costs two. Its grid is the one of naive.py, (q - 8) s + z with bf16 scale
and midpoint per group, so converting our format to it is a relayout, no new rounding:

    cpu_weight = pack_int4_for_cpu(packed, scales, zeros)      # at load time, once per matrix
    y = int4_linear_cpu(x, cpu_weight)

Only the operator's layout is kept in memory on the CPU (the 48B model's 27 GB of int4 weights cannot
be held twice in a 32 GB machine); the canonical layout is what the disk cache and the GPU hold.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kimi_desk.kernels.quant.naive import unpack_int4


class CpuInt4Weight(NamedTuple):
    """An int4 matrix [O, D] in the CPU operator's layout."""

    packed: torch.Tensor  # the operator's tiles, uint8
    scales_and_zeros: torch.Tensor  # [D / g, O, 2] bf16
    group: int
    in_features: int


def cpu_int4_fits(out_features: int, in_features: int) -> bool:
    """Whether the operator takes a matrix of this shape (its tiles are 16 rows by 32 inputs); present
    in PyTorch 2.6 and later."""
    ops = torch.ops.aten
    present = hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")
    return present and out_features % 16 == 0 and in_features % 32 == 0


def pack_int4_for_cpu(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> CpuInt4Weight:
    """Our layout [O, D / 2] (+ scales and zeros [O, D / g]) -> the operator's."""
    codes = unpack_int4(packed).to(torch.int32)  # [O, D]
    tiles = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 2)
    scales_and_zeros = torch.stack([scale, zero], dim=-1).to(torch.bfloat16).transpose(0, 1).contiguous()
    D = codes.shape[-1]
    return CpuInt4Weight(tiles, scales_and_zeros, D // scale.shape[-1], D)


def int4_linear_cpu(x: torch.Tensor, weight: CpuInt4Weight) -> torch.Tensor:
    """x [..., D] @ W^T -> [..., O] in x's dtype; the product in bf16 with float32 sums."""
    rows = x.reshape(-1, weight.in_features).to(torch.bfloat16)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, weight.packed, weight.group, weight.scales_and_zeros)
    return y.to(x.dtype).view(*x.shape[:-1], y.shape[-1])
