"""A decode token's routed experts computed on the GPU straight from the CPU operator's int4 tiles.

Experts kept in system RAM hold only PyTorch's CPU int4 layout (kernels/quant/cpu.py): each matrix in
blocks of 64 output rows, a block [D, 32] bytes, byte (d, r) holding row r's code d in its low half and
row r + 32's in its high half, with a bf16 scale and midpoint per group of inputs ([D / g, O, 2]). When
engine/offload.py copies some of a token's RAM experts to the GPU over PCIe instead of computing them on
the CPU, the copies land in a few slots in that layout, and this module computes them there: no
relayout to kernels/quant's layout (which would cost a dozen passes over the slots each layer).

`streamed_experts_triton(x, gate_up, down, weights)`: x [1, D]; gate_up = (tiles [S, 2I, D / 2] uint8, scales
[S, D / g, 2I, 2] bf16): the slot experts' w1 and w3 joined (w1's rows first); down = (tiles [S, D, I /
2], scales [S, I / g, D, 2]); weights [S] float32, each slot's mixing weight, 0 for an empty slot.
Returns sum_s weights[s] * w2_s (SiLU(w1_s x) * w3_s x), [1, D] float32.

`tiled_int4_gemv_kernel`, one program per (slot, block of 64 output rows): the block's [BD, 32] bytes
along the input (BD: whole groups, up to 256 inputs a step), both halves of each byte against the same
inputs, each group's scale and midpoint applied to its sums ((q - 8) s + z: s * sum (q - 8) x + z *
sum x). A slot of weight 0 writes zeros and reads nothing, so empty slots cost a launch's programs
only. Two launches (gate and up, then down, SiLU taken on the way in) and a weighted sum over the
slots. Products in float32, sums in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_desk.kernels import pdl_launch
from kimi_desk.kernels.grid_dependency import wait_for_previous_kernel
from kimi_desk.kernels.quant.cpu import CPU_TILE_ROWS


@triton.jit
def tiled_int4_gemv_kernel(
    tiles,
    scales,
    x,
    weights,
    out,
    stride_x,
    D: tl.constexpr,
    O: tl.constexpr,
    GROUP: tl.constexpr,
    BD: tl.constexpr,
    GATED: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    i_s, i_t = tl.program_id(0), tl.program_id(1)
    o_r = tl.arange(0, 32)
    o_lo = i_t * 64 + o_r  # the rows in the bytes' low halves; o_lo + 32 in their high halves
    p_out = out + i_s * O
    if tl.load(weights + i_s) == 0.0:
        tl.store(p_out + o_lo, tl.zeros([32], dtype=tl.float32))
        tl.store(p_out + o_lo + 32, tl.zeros([32], dtype=tl.float32))
        return
    p_tiles = tiles + i_s * (O * D // 2) + i_t * (D * 32)
    p_scales = scales + i_s * (D // GROUP * O * 2)
    NG: tl.constexpr = BD // GROUP  # whole groups in a step along the input
    o_g = tl.arange(0, NG)
    b_lo = tl.zeros([32], dtype=tl.float32)
    b_hi = tl.zeros([32], dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        if GATED:  # x holds [gate | up] of width 2D per slot: the input is SiLU(gate) * up
            gate = tl.load(x + i_s * stride_x + o_d)
            b_x = gate * tl.sigmoid(gate) * tl.load(x + i_s * stride_x + D + o_d)
        else:
            b_x = tl.load(x + i_s * stride_x + o_d).to(tl.float32)
        b_bytes = tl.load(p_tiles + o_d[:, None] * 32 + o_r[None, :])  # [BD, 32]
        # Each group's sums apart ([NG, 32]): its scale and midpoint apply to them.
        sum_lo = tl.sum(tl.reshape(((b_bytes & 15).to(tl.float32) - 8.0) * b_x[:, None], [NG, GROUP, 32]), 1)
        sum_hi = tl.sum(tl.reshape(((b_bytes >> 4).to(tl.float32) - 8.0) * b_x[:, None], [NG, GROUP, 32]), 1)
        sum_x = tl.sum(tl.reshape(b_x, [NG, GROUP]), 1)[:, None]
        p_group = p_scales + (d0 // GROUP + o_g)[:, None] * (O * 2)
        s_lo = tl.load(p_group + o_lo[None, :] * 2).to(tl.float32)
        z_lo = tl.load(p_group + o_lo[None, :] * 2 + 1).to(tl.float32)
        s_hi = tl.load(p_group + (o_lo[None, :] + 32) * 2).to(tl.float32)
        z_hi = tl.load(p_group + (o_lo[None, :] + 32) * 2 + 1).to(tl.float32)
        b_lo += tl.sum(s_lo * sum_lo + z_lo * sum_x, 0)
        b_hi += tl.sum(s_hi * sum_hi + z_hi * sum_x, 0)
    tl.store(p_out + o_lo, b_lo)
    tl.store(p_out + o_lo + 32, b_hi)


def _tiled_gemv(tiles, scales, x, weights, stride_x, gated):
    S, O, half_D = tiles.shape
    D = half_D * 2
    group = D // scales.shape[1]
    out = torch.empty(S, O, dtype=torch.float32, device=tiles.device)
    step = group  # whole groups a step, up to 256 inputs: few, long loads
    while 2 * step <= 256 and D % (2 * step) == 0:
        step *= 2
    tiled_int4_gemv_kernel[(S, O // CPU_TILE_ROWS)](
        tiles, scales, x, weights, out, stride_x, D, O, group, step, gated, **pdl_launch(tiles)
    )
    return out


def streamed_experts_triton(x, gate_up, down, weights):
    """The module docstring's sum over the slots, [1, D] float32, in two Triton launches and a sum
    (naive.streamed_experts_torch is the reference)."""
    S = weights.shape[0]
    gate_up_out = _tiled_gemv(*gate_up, x.reshape(-1).contiguous(), weights, 0, False)  # [S, 2I]
    down_out = _tiled_gemv(*down, gate_up_out, weights, gate_up_out.shape[1], True)  # [S, D]
    return (down_out * weights.view(S, 1)).sum(0, keepdim=True)
