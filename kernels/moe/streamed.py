"""Decode tokens' routed experts computed on the GPU straight from the CPU operator's int4 tiles.

Experts kept in system RAM hold only PyTorch's CPU int4 layout (kernels/quant/cpu.py's CpuInt4Layout,
which depends on the CPU): each matrix in blocks of R output rows, a block [D, R / 2] bytes, byte (d, j)
holding input d's code of two rows (j and j + R / 2, or 2j and 2j + 1), with a bf16 scale and midpoint
per group of inputs ([D / g, O, 2]). At decode engine/offload.py has the GPU compute a token's RAM
experts in that layout where they are: in pinned host memory, read over PCIe by the kernel itself, or
in a bank of slots in GPU memory that the experts were gathered into ahead of the choice. No relayout to
kernels/quant's layout (which would cost a dozen passes each layer) and no host step.

`streamed_experts_triton(x, gate_up, down, rows, weights, bank=None, counts=None)`: x [N, D]; gate_up =
(tiles [E, 2I, D / 2] uint8, scales [E, D / g, 2I, 2] bf16): a stack of experts' w1 and w3 joined (w1's
rows first); down = (tiles [E, D, I / 2], scales [E, I / g, D, 2]); rows [N, K] int64, the stack rows of
each token's K (token, expert) pairs (-1: none), weights [N, K] float32 their mixing weights. Returns for
each token the sum over its pairs of weights * w2 (SiLU(w1 x) * w3 x) of the pair's expert, [N, D]
float32 (each pair reads its expert: a few tokens, as in decode). The stack may live in pinned host
memory. `bank` = (gate_up, down, held): slots of the same form and held [B], the stack row each slot
holds (-1: none); a pair whose row a slot holds reads that slot (the first such) instead of the stack.
`counts` [3] int64: the pairs read from the stack are added to counts[0], those found in the bank to
counts[2].

`tiled_int4_gemv_kernel`, one program per (pair, block of R output rows): the pair's slot looked up in
`held` (B loads), then the block's [BD, R / 2] bytes along the input (BD: whole groups, up to 256 inputs
a step), both halves of each byte against the same inputs, each group's scale and midpoint applied to
its sums ((q - 8) s + z: s * sum (q - 8) x + z * sum x). A pair of row -1 writes zeros and reads
nothing. Two launches (gate and up, then down, SiLU taken on the way in) and a weighted sum over each
token's pairs. Products in float32, sums in float32.

`gather_rows_triton(src, rows, dst)`: dst[s] = src[rows[s]], a copy the GPU makes from pinned host memory
with no host step (the bank's fill).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_desk.kernels import pdl_launch
from kimi_desk.kernels.grid_dependency import wait_for_previous_kernel
from kimi_desk.kernels.quant.cpu import CpuInt4Layout, cpu_int4_layout


@triton.jit
def tiled_int4_gemv_kernel(
    tiles,
    scales,
    bank_tiles,
    bank_scales,
    held,
    counts,
    x,
    rows,
    out,
    stride_x,
    SLOTS: tl.constexpr,
    BLOCK_SLOTS: tl.constexpr,
    COUNT: tl.constexpr,
    D: tl.constexpr,
    O: tl.constexpr,
    GROUP: tl.constexpr,
    BD: tl.constexpr,
    GATED: tl.constexpr,
    PAIRS_PER_X: tl.constexpr,
    ROWS: tl.constexpr,
    SPLIT: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        wait_for_previous_kernel()
    i_s, i_t = tl.program_id(0), tl.program_id(1)
    HALF: tl.constexpr = ROWS // 2  # bytes of a block per input
    o_r = tl.arange(0, HALF)
    # The rows in the bytes' low halves and in their high halves.
    if SPLIT:
        o_lo = i_t * ROWS + o_r
        o_hi = o_lo + HALF
    else:
        o_lo = i_t * ROWS + 2 * o_r
        o_hi = o_lo + 1
    p_out = out + i_s * O
    row = tl.load(rows + i_s).to(tl.int64)
    if row < 0:
        tl.store(p_out + o_lo, tl.zeros([HALF], dtype=tl.float32))
        tl.store(p_out + o_hi, tl.zeros([HALF], dtype=tl.float32))
        return
    slot = -1
    if SLOTS > 0:  # the bank's slot holding this row, if one does
        o_k = tl.arange(0, BLOCK_SLOTS)
        first = tl.min(tl.where(tl.load(held + o_k, mask=o_k < SLOTS, other=-1) == row, o_k, BLOCK_SLOTS))
        slot = tl.where(first < BLOCK_SLOTS, first, -1)
    if COUNT:
        if i_t == 0:
            tl.atomic_add(counts + tl.where(slot >= 0, 2, 0), 1)
    if slot >= 0:
        p_tiles = bank_tiles + slot.to(tl.int64) * (O * D // 2) + i_t * (D * HALF)
        p_scales = bank_scales + slot.to(tl.int64) * (D // GROUP * O * 2)
    else:
        p_tiles = tiles + row * (O * D // 2) + i_t * (D * HALF)
        p_scales = scales + row * (D // GROUP * O * 2)
    NG: tl.constexpr = BD // GROUP  # whole groups in a step along the input
    o_g = tl.arange(0, NG)
    b_lo = tl.zeros([HALF], dtype=tl.float32)
    b_hi = tl.zeros([HALF], dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        p_x = x + (i_s // PAIRS_PER_X) * stride_x  # the pair's row of x
        if GATED:  # x holds [gate | up] of width 2D per pair: the input is SiLU(gate) * up
            gate = tl.load(p_x + o_d)
            b_x = gate * tl.sigmoid(gate) * tl.load(p_x + D + o_d)
        else:
            b_x = tl.load(p_x + o_d).to(tl.float32)
        b_bytes = tl.load(p_tiles + o_d[:, None] * HALF + o_r[None, :])  # [BD, HALF]
        # Each group's sums apart ([NG, HALF]): its scale and midpoint apply to them.
        sum_lo = tl.sum(tl.reshape(((b_bytes & 15).to(tl.float32) - 8.0) * b_x[:, None], [NG, GROUP, HALF]), 1)
        sum_hi = tl.sum(tl.reshape(((b_bytes >> 4).to(tl.float32) - 8.0) * b_x[:, None], [NG, GROUP, HALF]), 1)
        sum_x = tl.sum(tl.reshape(b_x, [NG, GROUP]), 1)[:, None]
        p_group = p_scales + (d0 // GROUP + o_g)[:, None] * (O * 2)
        s_lo = tl.load(p_group + o_lo[None, :] * 2).to(tl.float32)
        z_lo = tl.load(p_group + o_lo[None, :] * 2 + 1).to(tl.float32)
        s_hi = tl.load(p_group + o_hi[None, :] * 2).to(tl.float32)
        z_hi = tl.load(p_group + o_hi[None, :] * 2 + 1).to(tl.float32)
        b_lo += tl.sum(s_lo * sum_lo + z_lo * sum_x, 0)
        b_hi += tl.sum(s_hi * sum_hi + z_hi * sum_x, 0)
    tl.store(p_out + o_lo, b_lo)
    tl.store(p_out + o_hi, b_hi)


def _tiled_gemv(stack, bank, held, counts, x, rows, pairs_per_x, gated, layout: CpuInt4Layout):
    tiles, scales = stack
    S = rows.shape[0]
    _, O, half_D = tiles.shape
    D = half_D * 2
    group = D // scales.shape[1]
    out = torch.empty(S, O, dtype=torch.float32, device=x.device)
    step = group  # whole groups a step, up to 256 inputs: few, long loads
    while 2 * step <= 256 and D % (2 * step) == 0:
        step *= 2
    block_rows, split = layout
    bank_tiles, bank_scales = bank if bank is not None else stack
    tiled_int4_gemv_kernel[(S, O // block_rows)](
        tiles,
        scales,
        bank_tiles,
        bank_scales,
        rows if held is None else held,
        rows if counts is None else counts,
        x,
        rows,
        out,
        x.stride(0),
        0 if held is None else held.shape[0],
        1 if held is None else triton.next_power_of_2(held.shape[0]),
        counts is not None,
        D,
        O,
        group,
        step,
        gated,
        pairs_per_x,
        block_rows,
        split,
        **pdl_launch(x),
    )
    return out


def streamed_experts_triton(
    x, gate_up, down, rows, weights, bank=None, counts=None, layout: CpuInt4Layout | None = None
):
    """The module docstring's sums, [N, D] float32, in two Triton launches and a sum
    (naive.streamed_experts_torch is the reference); the tiles in `layout`, by default this machine's."""
    x = x.reshape(-1, x.shape[-1]).contiguous()
    N, K = x.shape[0], rows.shape[-1]
    if rows.numel() != N * K or weights.numel() != N * K:
        raise ValueError(f"rows {tuple(rows.shape)} and weights {tuple(weights.shape)} do not give {N} tokens K pairs")
    if N == 0:
        return x.new_zeros(0, x.shape[-1], dtype=torch.float32)
    layout = layout or cpu_int4_layout()
    rows, weights = rows.reshape(N * K).contiguous(), weights.reshape(N * K).contiguous()
    bank_gate_up, bank_down, held = bank if bank is not None else (None, None, None)
    gate_up_out = _tiled_gemv(gate_up, bank_gate_up, held, counts, x, rows, K, False, layout)  # [N K, 2I]
    down_out = _tiled_gemv(down, bank_down, held, None, gate_up_out, rows, 1, True, layout)  # [N K, D]
    return (down_out.view(N, K, -1) * weights.view(N, K, 1)).sum(1)


@triton.jit
def gather_rows_kernel(src, dst, rows, WORDS: tl.constexpr, BLOCK: tl.constexpr):
    """dst[s] = src[rows[s]] for rows[s] >= 0, rows of WORDS 32-bit words; one program per (s, block)."""
    i_s, i_b = tl.program_id(0), tl.program_id(1)
    row = tl.load(rows + i_s).to(tl.int64)
    if row < 0:
        return
    o = i_b * BLOCK + tl.arange(0, BLOCK)
    mask = o < WORDS
    tl.store(dst + i_s * WORDS + o, tl.load(src + row * WORDS + o, mask=mask), mask=mask)


def gather_rows_triton(src: torch.Tensor, rows: torch.Tensor, dst: torch.Tensor) -> None:
    """dst[s] = src[rows[s]] where rows[s] >= 0 (others left as they are), with no host step: src may be
    pinned host memory, read by the GPU in place. Contiguous tensors whose rows are whole 4-byte words."""
    words = src[0].numel() * src.element_size() // 4
    block = 4096
    as_words = [t.reshape(t.shape[0], -1).view(torch.int32) for t in (src, dst)]
    gather_rows_kernel[(rows.shape[0], triton.cdiv(words, block))](*as_words, rows, words, block)
