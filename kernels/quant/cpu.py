"""int4 and int8 products on the CPU through PyTorch's weight-only operators.

`torch.ops.aten._weight_int4pack_mm_for_cpu` multiplies bf16 rows by an int4 weight in its own tiled
layout, unpacking in registers (AVX-512 / AVX2 kernels): a one-token product reads half a byte per
weight where a bf16 weight costs two. Its grid is the one of naive.py, (q - 8) s + z with bf16 scale
and midpoint per group, so converting our format to it is a relayout, no new rounding:

    cpu_weight = pack_int4_for_cpu(packed, scales, zeros)      # at load time, once per matrix
    y = int4_linear_cpu(x, cpu_weight)

Only the operator's layout is kept in memory on the CPU (the 48B model's 27 GB of int4 weights cannot
be held twice in a 32 GB machine); the canonical layout is what the disk cache and the GPU hold. Its
tiles are blocks of 32 or 64 rows: a matrix of other heights (the KDA layer's joined input projection)
is packed with zero rows to the next whole block, which the product computes and drops.

A routed expert is two products, not three: its w1 and w3 (same input, same height) are packed as one
matrix of twice the height (`pack_int4_expert_for_cpu`), so a token's gate and up projections are one
call of the operator over twice the rows; at one token each call's fixed cost (a parallel region over
the threads) is a large part of the time, and the 48B model's expert runs about 1.4x faster this way
on 16 cores. The operator's tiles are blocks of whole rows, so the joined tiles are w1's tiles followed
by w3's, and the first half of the joined matrix is w1 exactly. A layer's experts are stacked, each of
the two matrices in one tensor over the experts (`stack_int4_experts_for_cpu`): a copy then streams a
run of experts to a GPU, and one call of our AVX2 kernels takes tokens through all their chosen experts
(`int4_experts_stacked`).

The tiles' layout is PyTorch's and depends on the CPU it was built to run on (blocks of 64 rows with two
rows 32 apart in a byte where AVX-512 is present, 32 rows 16 apart with AVX2, 32 rows in neighbouring
pairs otherwise), and the code that reads tiles directly (`tiles_to_codes`, the GPU kernel of
kernels/moe/streamed.py) must follow it: `cpu_int4_layout()` reads it off a small probe matrix once
instead of assuming one.

`int8_linear_cpu(x, q, scale)` is `torch.ops.aten._weight_int8pack_mm` on our int8 layout as it is
(codes [O, D], a scale per row): a few rows (decode) read one byte a weight, where dequantizing first
wrote and read the weight in bf16 again at every call. For many rows (prefill) the dequantized weight's
product is faster, and kernels/quant takes that.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kimi_desk.kernels.quant import avx2
from kimi_desk.kernels.quant.naive import unpack_int4


class CpuInt4Layout(NamedTuple):
    """How the operator's tiles hold the codes: blocks of `rows` output rows, a block [D, rows / 2] bytes
    (input by input), byte j of an input holding two rows' codes, the first in its low half: rows j and
    j + rows / 2 of the block (`split`), or rows 2j and 2j + 1."""

    rows: int
    split: bool


# Every layout PyTorch's CPU kernels are known to pack in, the AVX-512 one first.
CPU_INT4_LAYOUTS = tuple(CpuInt4Layout(rows, split) for split in (True, False) for rows in (64, 32, 16))


class CpuInt4Weight(NamedTuple):
    """An int4 matrix [O, D] in the CPU operator's layout (its rows padded to whole blocks of the layout's)."""

    packed: torch.Tensor  # the operator's tiles, uint8
    scales_and_zeros: torch.Tensor  # [D / g, O', 2] bf16, O' = O rounded up to whole blocks
    group: int
    in_features: int
    out_features: int


class CpuInt4Expert(NamedTuple):
    """A routed expert on the CPU: `gate_up` = [w1; w3] joined (2 * hidden rows), `down` = w2."""

    gate_up: CpuInt4Weight
    down: CpuInt4Weight


class CpuInt4Stack(NamedTuple):
    """One matrix of every routed expert of a layer in the operator's layout, stacked over the experts:
    tiles [E, ...] uint8, scales_and_zeros [E, D / g, O', 2] bf16."""

    tiles: torch.Tensor
    scales_and_zeros: torch.Tensor
    group: int
    in_features: int


# A layer's int4 experts on the CPU: its stacks by name, each with the matrices it holds, top to bottom.
JOINED = {"w13": ("w1", "w3"), "w2": ("w2",)}


def stack_int4_experts_for_cpu(
    experts, n: int, pin: bool = False
) -> tuple[dict[str, CpuInt4Stack], list[CpuInt4Expert]]:
    """n experts (an iterable of CpuInt4Expert, consumed one at a time) -> the stacks of JOINED (pinned
    for asynchronous copies if asked) and each expert's views into them. Stacked, one layer's experts are
    two tensors, so that a copy streams a run of them and one kernel call reaches any of them
    (int4_experts_stacked)."""
    stacks: dict[str, list] = {}
    for e, expert in enumerate(experts):
        for name, one in zip(JOINED, expert):
            if e == 0:
                stacks[name] = [
                    torch.empty((n, *one.packed.shape), dtype=one.packed.dtype, pin_memory=pin),
                    torch.empty((n, *one.scales_and_zeros.shape), dtype=torch.bfloat16, pin_memory=pin),
                    one.group,
                    one.in_features,
                ]
            stacks[name][0][e].copy_(one.packed)
            stacks[name][1][e].copy_(one.scales_and_zeros)
    made = {name: CpuInt4Stack(*stack) for name, stack in stacks.items()}
    views = [
        CpuInt4Expert(
            *(
                CpuInt4Weight(s.tiles[e], s.scales_and_zeros[e], s.group, s.in_features, s.tiles.shape[-2])
                for s in made.values()
            )
        )
        for e in range(n)
    ]
    return made, views


def int4_experts_stacked(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    stacks: dict[str, CpuInt4Stack],
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor | None:
    """sum_j weights[n, j] * expert_{ids[n, j]}(x[n]) for tokens x [N, D] over stacked experts (ids [N, k]
    int64, < 0 skipped; weights [N, k]) in one call of our AVX2 kernels (one token: every expert's
    products in one parallel region; more: grouped by expert, a few passes of the threads in all):
    [N, D] in out_dtype (float32 or bfloat16). None where those kernels do not read these tiles (the
    caller then takes the experts one by one)."""
    gate_up, down = stacks["w13"], stacks["w2"]
    layout = cpu_int4_layout()
    hidden = down.in_features
    if not (
        avx2.reads(layout.rows, layout.split, gate_up.group, gate_up.in_features, gate_up.scales_and_zeros.shape[-2])
        and avx2.reads(layout.rows, layout.split, down.group, hidden, down.scales_and_zeros.shape[-2])
    ):
        return None
    if x.shape[0] == 1 and ids.shape[-1] <= avx2.MAX_EXPERTS:
        return avx2.int4_experts_one_token(x, ids[0], weights[0], gate_up, down, layout.rows, out_dtype)
    return avx2.int4_experts_grouped(x, ids, weights, gate_up, down, layout.rows, out_dtype)


def cpu_int4_fits(out_features: int, in_features: int) -> bool:
    """Whether the operator takes a matrix of this shape (inputs in 32s; any height, padded to its 16-row
    tiles); present in PyTorch 2.6 and later, on a CPU whose tile layout is known (cpu_int4_layout)."""
    return in_features % 32 == 0 and cpu_int4_layout() is not None


@functools.cache
def cpu_int4_layout() -> CpuInt4Layout | None:
    """The layout this PyTorch packs int4 tiles in on this CPU: the one of CPU_INT4_LAYOUTS under which
    probe matrices (each code telling its row or its input) come back from the operator's packing as
    they went in. None when the operator is missing or no known layout fits (the CPU int4 path is then
    not used)."""
    ops = torch.ops.aten
    if not (hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")):
        return None
    rows, inputs = torch.arange(128, device="cpu").view(-1, 1), torch.arange(64, device="cpu").view(1, -1)
    probes = [(rows % 16).expand(-1, 64), (rows // 16 + inputs) % 16, (inputs % 16).expand(128, -1)]
    packed = [ops._convert_weight_to_int4pack_for_cpu(p.to(torch.int32).contiguous(), 2) for p in probes]
    for layout in CPU_INT4_LAYOUTS:
        if all(torch.equal(unpack_int4(tiles_to_codes(t, 128, layout)), p) for t, p in zip(packed, probes)):
            return layout
    return None


def codes_to_tiles(packed: torch.Tensor, layout: CpuInt4Layout | None = None) -> torch.Tensor:
    """kernels/quant's packed codes [O, D / 2] -> the operator's tiles [O, D / 2] (O a multiple of 16), the
    inverse of `tiles_to_codes`. Whole blocks of the layout's rows are rearranged here byte-wise: a byte of
    ours holds inputs 2c and 2c + 1 of one row, a tile's byte one input of the block's two rows, so the
    two rows' bytes give input 2c's tile byte from their low halves and input 2c + 1's from their high
    halves, then a transpose per block. The operator packs the rows left after the whole blocks (PyTorch
    tiles them in smaller blocks of its own choosing) from int32 codes: its conversion widens every code
    to int32 first, which made it the slow part of loading an int4 model on the CPU (BENCHMARKS-log.md)."""
    rows, split = layout or cpu_int4_layout()
    O, half = packed.shape
    whole = O // rows * rows
    tiles = torch.empty_like(packed)
    if whole:
        blocks = packed[:whole].view(whole // rows, rows, half)
        first, second = (
            (blocks[:, : rows // 2], blocks[:, rows // 2 :]) if split else (blocks[:, 0::2], blocks[:, 1::2])
        )
        even = torch.bitwise_left_shift(second, 4).bitwise_or_(first & 15)  # [blocks, rows / 2, D / 2]
        odd = torch.bitwise_right_shift(first, 4).bitwise_or_(second & 0xF0)
        out = tiles[:whole].view(whole // rows, half, 2, rows // 2)  # [blocks, D / 2, input parity, rows / 2]
        out[:, :, 0].copy_(even.transpose(1, 2))
        out[:, :, 1].copy_(odd.transpose(1, 2))
    if whole < O:
        rest = unpack_int4(packed[whole:]).to(torch.int32)
        tiles[whole:] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(rest.contiguous(), 2)
    return tiles


def pack_int4_for_cpu(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> CpuInt4Weight:
    """Our layout [O, D / 2] (+ scales and zeros [O, D / g]) -> the operator's."""
    scales_and_zeros = torch.stack([scale, zero], dim=-1).to(torch.bfloat16)  # [O, D / g, 2]
    O, D = packed.shape[0], packed.shape[1] * 2
    # Zero rows up to whole blocks of the layout's rows, which our AVX2 kernels read (the operator itself
    # needs 16s).
    pad = -O % max(16, cpu_int4_layout().rows)
    if pad:
        # Zero rows: scale and midpoint 0 make every weight of the row 0.
        packed = torch.cat([packed, packed.new_zeros(pad, D // 2)])
        scales_and_zeros = torch.cat([scales_and_zeros, scales_and_zeros.new_zeros(pad, *scales_and_zeros.shape[1:])])
    tiles = codes_to_tiles(packed.contiguous())
    return CpuInt4Weight(tiles, scales_and_zeros.transpose(0, 1).contiguous(), D // scale.shape[-1], D, O)


def pack_int4_expert_for_cpu(w1, w2, w3) -> CpuInt4Expert:
    """An expert's three matrices, each (packed, scale, zero) in our layout -> the CPU layout, w1 and w3
    joined."""
    joined = (torch.cat([a, b]) for a, b in zip(w1, w3))
    return CpuInt4Expert(pack_int4_for_cpu(*joined), pack_int4_for_cpu(*w2))


def int4_expert_cpu(x: torch.Tensor, expert: CpuInt4Expert) -> torch.Tensor:
    """w2 (silu(w1 x) * w3 x) for rows x [..., D] -> [..., D] in x's dtype."""
    gate, up = int4_linear_cpu(x, expert.gate_up).chunk(2, dim=-1)
    return int4_linear_cpu(F.silu(gate) * up, expert.down)


def int4_linear_cpu(x: torch.Tensor, weight: CpuInt4Weight) -> torch.Tensor:
    """x [..., D] @ W^T -> [..., O] in x's dtype: our AVX2 kernels where they run (kernels/quant/avx2.py:
    x rounded to int8 in blocks of 32, integer products, float32 and bfloat16 read and written as they
    are), else the operator (x rounded to bf16); float32 sums either way."""
    rows = x.reshape(-1, weight.in_features)
    layout = cpu_int4_layout()
    padded_rows = weight.scales_and_zeros.shape[1]
    if x.dtype in (torch.float32, torch.bfloat16) and avx2.reads(
        layout.rows, layout.split, weight.group, weight.in_features, padded_rows
    ):
        y = avx2.int4_linear_avx2(
            rows, weight.packed, weight.scales_and_zeros, layout.rows, weight.group, weight.out_features
        )
        return y.view(*x.shape[:-1], weight.out_features)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(
        rows.to(torch.bfloat16), weight.packed, weight.group, weight.scales_and_zeros
    )
    if y.shape[-1] != weight.out_features:
        y = y[:, : weight.out_features]
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.out_features)


def tiles_to_codes(tiles: torch.Tensor, out_features: int, layout: CpuInt4Layout | None = None) -> torch.Tensor:
    """The CPU operator's int4 tiles [..., O, D / 2] (O in whole blocks of the layout's rows) ->
    kernels/quant's packed codes [..., O, D / 2]: row by row, byte j holding codes 2j (low) and 2j + 1
    (high). `layout` defaults to this machine's (cpu_int4_layout)."""
    rows, split = layout or cpu_int4_layout()
    lead = tiles.shape[:-2]
    D = tiles.shape[-1] * 2
    t = tiles.reshape(*lead, out_features // rows, D, rows // 2)
    low, high = t & 15, t >> 4
    codes = torch.cat([low, high], dim=-1) if split else torch.stack([low, high], dim=-1).flatten(-2)
    codes = codes.transpose(-1, -2).reshape(*lead, out_features, D)  # [..., O, D], one code a byte
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def tiles_to_scales(sz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., G, O, 2] (the operator's scales and zeros) -> scale and zero [..., O, G]."""
    return sz[..., 0].transpose(-1, -2), sz[..., 1].transpose(-1, -2)


def cpu_int8_fits(x: torch.Tensor, q: torch.Tensor) -> bool:
    """Whether int8_linear_cpu takes this product: int8 codes, x on the CPU in a float dtype the operator
    takes, present in PyTorch 2.4 and later."""
    return (
        q.dtype == torch.int8
        and x.device.type == "cpu"
        and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and hasattr(torch.ops.aten, "_weight_int8pack_mm")
    )


def int8_linear_cpu(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., D] @ (Q * s)^T -> [..., O] in x's dtype, Q int8 [O, D], s [O] float32, float32 sums, the
    scale applied to each sum: our AVX2 kernel where it runs (x rounded to int8 in blocks of 32, integer
    products: kernels/quant/avx2.py), else PyTorch's operator with x and s rounded to bf16 (its float32
    form is 6x slower than its bf16 form on an AVX2 CPU)."""
    if avx2.int8_reads(*q.shape):
        y = avx2.int8_linear_avx2(x.reshape(-1, q.shape[-1]), q, scale)
        return y.to(x.dtype).view(*x.shape[:-1], q.shape[0])  # float16 comes back as float32
    rows = x.reshape(-1, q.shape[-1]).to(torch.bfloat16)
    y = torch.ops.aten._weight_int8pack_mm(rows.contiguous(), q, scale.to(torch.bfloat16))
    return y.to(x.dtype).view(*x.shape[:-1], q.shape[0])
