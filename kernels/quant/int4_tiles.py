"""int4 codes as dot operands, shared by the Triton kernels that read int4 weights.

A byte holds two codes q (0..15), the even input in the low nibble. `int4_codes` unpacks a tile of bytes
into the codes in input order, as bf16 values 128 + q: the bits 0x4300 | q are that number exactly
(0x4300 is 128.0, and q fills the low mantissa bits), so no integer-to-float conversion is needed, only
integer ORs and a bitcast. The dots then multiply 128 + q by x exactly (8 significant bits).

A tile never spans two groups of inputs (its width divides the group), so its group's scale s and
midpoint z factor out of the products:
    sum_k ((q_k - 8) s + z) x_k  =  s * sum_k (128 + q_k) x_k  +  (z - 136 s) * sum_k x_k,
one dot of raw codes and one sum of x per tile, and two multiply-adds per output: the dequantized
weight is never formed, and scales and zeros are read once per row and group, not per weight.
"""

from __future__ import annotations

import triton
import triton.language as tl

# 128 (the codes' offset in their bf16 form) + 8 (the grid's midpoint code): z - CODE_OFFSET s is the
# coefficient of sum_k x_k.
CODE_OFFSET = tl.constexpr(136.0)


@triton.jit
def int4_codes(b_packed, ROWS: tl.constexpr, COLS: tl.constexpr, ALONG_ROWS: tl.constexpr):
    """A byte tile's codes as bf16 (128 + q), in input order. Inputs run along the columns of
    [ROWS, COLS / 2] bytes (ALONG_ROWS false: the tile is [ROWS, COLS]), or along the rows of
    [ROWS / 2, COLS] bytes (ALONG_ROWS true)."""
    b_lo = (b_packed & 15).to(tl.int16) | 0x4300
    b_hi = (b_packed >> 4).to(tl.int16) | 0x4300
    b_both = tl.join(b_lo, b_hi)  # the two codes of each byte side by side, on a new last axis
    if ALONG_ROWS:
        b_both = tl.permute(b_both, (0, 2, 1))
    return tl.reshape(b_both, [ROWS, COLS]).to(tl.bfloat16, bitcast=True)


@triton.jit
def int4_code_halves(b_packed):
    """A byte tile's low and high codes as bf16 (128 + q), each the shape of the tile: the even inputs'
    and the odd inputs' codes, for products with x's even and odd inputs (no reordering of the tile)."""
    b_lo = ((b_packed & 15).to(tl.int16) | 0x4300).to(tl.bfloat16, bitcast=True)
    b_hi = ((b_packed >> 4).to(tl.int16) | 0x4300).to(tl.bfloat16, bitcast=True)
    return b_lo, b_hi


@triton.jit
def int4_piece_inputs(p_x, k0, K: tl.constexpr, PIECE: tl.constexpr, PIECES: tl.constexpr):
    """Inputs k0 to k0 + PIECES * PIECE of a vector of K at p_x, as PIECES pieces of PIECE inputs each
    inside one group: the bytes' offsets [PIECES, PIECE / 2] and masks, and the even and the odd inputs
    in fp32 ([PIECES, PIECE / 2] each, against the low and the high codes)."""
    o_b = k0 // 2 + tl.arange(0, PIECES)[:, None] * (PIECE // 2) + tl.arange(0, PIECE // 2)[None, :]
    m_b = o_b < K // 2
    b_even = tl.load(p_x + 2 * o_b, mask=m_b, other=0.0).to(tl.float32)
    b_odd = tl.load(p_x + 2 * o_b + 1, mask=m_b, other=0.0).to(tl.float32)
    return o_b, m_b, b_even, b_odd


@triton.jit
def int4_piece_row_sums(p_codes, p_scale, p_zero, m_rows, m_pieces, m_bytes, b_even, b_odd):
    """Row sums of an int4 tile of several pieces (each inside one group) on the CUDA cores, for one
    token: the tile's bytes at p_codes [rows, PIECES, PIECE / 2], its rows' scales and midpoints per
    piece at p_scale, p_zero [rows, PIECES], the inputs from int4_piece_inputs. Per piece the codes
    times x, then the group's scale and midpoint times sum(x); summed over the pieces: [rows]."""
    b_p = tl.load(p_codes, mask=m_rows[:, None, None] & m_bytes[None, :, :], other=0)
    m_s = m_rows[:, None] & m_pieces[None, :]
    b_s = tl.load(p_scale, mask=m_s, other=0.0).to(tl.float32)
    b_z = tl.load(p_zero, mask=m_s, other=0.0).to(tl.float32)
    b_lo, b_hi = int4_code_halves(b_p)
    b_dot = tl.sum(b_lo.to(tl.float32) * b_even[None, :, :] + b_hi.to(tl.float32) * b_odd[None, :, :], 2)
    b_x = tl.sum(b_even, 1) + tl.sum(b_odd, 1)
    return tl.sum(b_s * b_dot + (b_z - CODE_OFFSET * b_s) * b_x[None, :], 1)


def int4_pieces(block: int, group: int) -> tuple[int, int]:
    """(PIECE, PIECES) for a CUDA-core int4 tile of `block` inputs (a power of two): pieces of at most a
    group (at least 32 inputs) making up the block."""
    piece = int4_block(block, group)
    return piece, max(1, block // piece)


def int4_block(block: int, group: int) -> int:
    """A tile width for int4 inputs: at most the group (a tile lies inside one group), at least 32 (two
    16-wide halves of bytes; tl.dot's smallest side is 16)."""
    return max(32, min(block, group, triton.next_power_of_2(block)))
