"""A decode token's routed experts computed on the GPU straight from the CPU operator's int4 tiles.

Experts kept in system RAM hold only PyTorch's CPU int4 layout (kernels/quant/cpu.py's CpuInt4Layout,
which depends on the CPU): each matrix in blocks of R output rows, a block [D, R / 2] bytes, byte (d, j)
holding input d's code of two rows (j and j + R / 2, or 2j and 2j + 1), with a bf16 scale and midpoint
per group of inputs ([D / g, O, 2]). When
engine/offload.py copies some of a token's RAM experts to the GPU over PCIe instead of computing them on
the CPU, the copies land in a few slots in that layout, and this module computes them there: no
relayout to kernels/quant's layout (which would cost a dozen passes over the slots each layer).

`streamed_experts_triton(x, gate_up, down, weights)`: x [1, D]; gate_up = (tiles [S, 2I, D / 2] uint8, scales
[S, D / g, 2I, 2] bf16): the slot experts' w1 and w3 joined (w1's rows first); down = (tiles [S, D, I /
2], scales [S, I / g, D, 2]); weights [S] float32, each slot's mixing weight, 0 for an empty slot.
Returns sum_s weights[s] * w2_s (SiLU(w1_s x) * w3_s x), [1, D] float32.

`tiled_int4_gemv_kernel`, one program per (slot, block of R output rows): the block's [BD, R / 2] bytes
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
from kimi_desk.kernels.quant.cpu import CpuInt4Layout, cpu_int4_layout


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
    ROWS: tl.constexpr,
    SPLIT: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
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
    if tl.load(weights + i_s) == 0.0:
        tl.store(p_out + o_lo, tl.zeros([HALF], dtype=tl.float32))
        tl.store(p_out + o_hi, tl.zeros([HALF], dtype=tl.float32))
        return
    p_tiles = tiles + i_s * (O * D // 2) + i_t * (D * HALF)
    p_scales = scales + i_s * (D // GROUP * O * 2)
    NG: tl.constexpr = BD // GROUP  # whole groups in a step along the input
    o_g = tl.arange(0, NG)
    b_lo = tl.zeros([HALF], dtype=tl.float32)
    b_hi = tl.zeros([HALF], dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        if GATED:  # x holds [gate | up] of width 2D per slot: the input is SiLU(gate) * up
            gate = tl.load(x + i_s * stride_x + o_d)
            b_x = gate * tl.sigmoid(gate) * tl.load(x + i_s * stride_x + D + o_d)
        else:
            b_x = tl.load(x + i_s * stride_x + o_d).to(tl.float32)
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


def _tiled_gemv(tiles, scales, x, weights, stride_x, gated, layout: CpuInt4Layout):
    S, O, half_D = tiles.shape
    D = half_D * 2
    group = D // scales.shape[1]
    out = torch.empty(S, O, dtype=torch.float32, device=tiles.device)
    step = group  # whole groups a step, up to 256 inputs: few, long loads
    while 2 * step <= 256 and D % (2 * step) == 0:
        step *= 2
    rows, split = layout
    tiled_int4_gemv_kernel[(S, O // rows)](
        tiles, scales, x, weights, out, stride_x, D, O, group, step, gated, rows, split, **pdl_launch(tiles)
    )
    return out


def streamed_experts_triton(x, gate_up, down, weights, layout: CpuInt4Layout | None = None):
    """The module docstring's sum over the slots, [1, D] float32, in two Triton launches and a sum
    (naive.streamed_experts_torch is the reference); the tiles in `layout`, by default this machine's."""
    S = weights.shape[0]
    layout = layout or cpu_int4_layout()
    gate_up_out = _tiled_gemv(*gate_up, x.reshape(-1).contiguous(), weights, 0, False, layout)  # [S, 2I]
    down_out = _tiled_gemv(*down, gate_up_out, weights, gate_up_out.shape[1], True, layout)  # [S, D]
    return (down_out * weights.view(S, 1)).sum(0, keepdim=True)
