"""Weight-only quantization (naive.py has the formats and the formulas):

- `row_scaled_linear(x, q, scale)`: x @ (Q * s)^T for fp8 or int8 codes Q [O, D] with one float32
  scale per output row s [O];
- `int4_linear(x, packed, scale, zero)`: x @ ((q - 8) s + z)^T for int4 codes packed two a byte
  [O, D / 2] with a bf16 scale and midpoint per group of inputs [O, D / g].

On CUDA, up to GEMV_MAX_TOKENS rows of x (leading dims flattened: decode, speculative decode) go to the
Triton GEMVs of gemv.py, which read the codes once for all rows and dequantize in
registers: decode is bound by reading weights. More rows, and the CPU, take the PyTorch forms, which
dequantize the weight then multiply (on an AVX2 CPU int8 codes are dequantized by our kernel in one
pass, a block of rows at a time: `dequantized_blocks`); on the CPU an int4 matrix prepared with cpu.py's
layout takes our AVX2 kernels (avx2.py) or PyTorch's int4 operator instead (engine/quantize.py's
Int4Linear holds it), and a few rows of x by int8 codes PyTorch's int8 operator (cpu.py).
"""

import torch
import torch.nn.functional as F

from kimi_desk.kernels import use_triton
from kimi_desk.kernels.quant import avx2
from kimi_desk.kernels.quant.cpu import cpu_int8_fits, int8_linear_cpu
from kimi_desk.kernels.quant.naive import (
    FP8,
    dequantize_int4_groups,
    dequantize_rows_torch,
    int4_group_size,
    int4_linear_torch,
    quantize_fp8_rows,
    quantize_int4_groups,
    quantize_int8_rows,
    row_scaled_linear_torch,
)

__all__ = [
    "FP8",
    "dequantize_int4_groups",
    "dequantize_rows",
    "int4_group_size",
    "int4_linear",
    "quantize_fp8_rows",
    "quantize_int4_groups",
    "quantize_int8_rows",
    "row_scaled_linear",
]

# Rows up to which the GEMV kernels run: they pad x to 16 rows (tl.dot's smallest side) and read each
# weight tile once for all of them. Past that, a product on the dequantized weight (prefill) has the
# tensor cores' full width and the dequantized copy's bytes are shared by many rows.
GEMV_MAX_TOKENS = 16
# The dequantized weight of a many-row int8 product on the CPU is made and multiplied in blocks of rows
# of at most this many bytes: a buffer this size comes back from the C library's heap call after call,
# where a whole large weight's copy (over 32 MB: glibc maps it afresh each time) is paid again in page
# faults, which cost more than the dequantization itself.
DEQUANTIZED_BLOCK_BYTES = 24 << 20


def row_scaled_linear(x, q, scale):
    if x.shape[:-1].numel() <= GEMV_MAX_TOKENS:
        if use_triton(x):
            # Imported here: Triton is only loaded when a CUDA tensor asks for it.
            from kimi_desk.kernels.quant.gemv import row_scaled_gemv

            return row_scaled_gemv(x, q, scale)
        if cpu_int8_fits(x, q):
            return int8_linear_cpu(x, q, scale)
    if not use_triton(x) and avx2.int8_dequantizes(q, scale, x.dtype):
        return dequantized_blocks(x, q, scale)
    return row_scaled_linear_torch(x, q, scale)


def dequantized_blocks(x, q, scale):
    """x @ (Q * s)^T on an AVX2 CPU, Q dequantized to x's dtype DEQUANTIZED_BLOCK_BYTES at a time."""
    O, D = q.shape
    rows = max(16, DEQUANTIZED_BLOCK_BYTES // (D * x.element_size()))
    if rows >= O:
        return F.linear(x, avx2.int8_dequantize_rows(q, scale, x.dtype))
    blocks = [
        F.linear(x, avx2.int8_dequantize_rows(q[r : r + rows], scale[r : r + rows], x.dtype)) for r in range(0, O, rows)
    ]
    return torch.cat(blocks, dim=-1)


def dequantize_rows(q, scale, dtype):
    """(Q, s) of a row-scaled format -> Q * s[..., None] in `dtype` (naive.py's dequantize_rows_torch):
    int8 codes on an AVX2 CPU in one pass of our kernel (kernels/quant/avx2.py)."""
    if avx2.int8_dequantizes(q, scale, dtype):
        return avx2.int8_dequantize_rows(q, scale, dtype)
    return dequantize_rows_torch(q, scale, dtype)


def int4_linear(x, packed, scale, zero):
    if x.shape[:-1].numel() <= GEMV_MAX_TOKENS and use_triton(x):
        from kimi_desk.kernels.quant.gemv import int4_gemv

        return int4_gemv(x, packed, scale, zero)
    return int4_linear_torch(x, packed, scale, zero)
