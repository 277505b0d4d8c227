"""Weight-only quantization formats in PyTorch: the formulas every fast path is tested against.

Row-scaled formats, fp8 and int8: a weight W [..., O, D] is stored as Q [..., O, D] with one float32
scale per output row s [..., O], so every row uses the format's whole range:
- fp8 (float8_e4m3fn): Q = round_fp8(W / s), s = max_d |W| / 448 (e4m3's largest finite value);
- int8: Q = round(W / s) in [-127, 127], s = max_d |W| / 127 (symmetric, no zero point).
W is approximated by Q * s[..., None]; a linear layer computes y = x @ (Q * s)^T. Rows of zeros get
s = 1 (Q = 0), never a division by zero.

Group-wise int4: W's rows are cut into groups of g consecutive inputs (g = 128, 64 or 32, the largest
that divides D). Per group, with lo and hi its smallest and largest value,
    s = (hi - lo) / 15,   z = lo + 8 s,   q = round((W - lo) / s) in [0, 15],   W ~ (q - 8) s + z,
scale s and midpoint z in bfloat16 (the zero point pays: a group's values are rarely centred on 0, and
an asymmetric grid uses all 16 levels where a symmetric one wastes one). Two values share a byte, the
even input in the low nibble: packed [..., O, D / 2] uint8, scales and zeros [..., O, D / g].
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127
INT4_GROUP_SIZES = (128, 64, 32)


def quantize_fp8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [..., O, D] -> (Q [..., O, D] float8_e4m3fn, s [..., O] float32)."""
    w = weight.float()
    scale = _row_scale(w, FP8_MAX)
    q = (w / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def quantize_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [..., O, D] -> (Q [..., O, D] int8, s [..., O] float32)."""
    w = weight.float()
    scale = _row_scale(w, INT8_MAX)
    q = (w / scale[..., None]).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def _row_scale(w: torch.Tensor, largest: float) -> torch.Tensor:
    amax = w.abs().amax(dim=-1)
    return torch.where(amax > 0, amax / largest, torch.ones_like(amax))


def dequantize_rows_torch(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(Q, s) of a row-scaled format -> Q * s[..., None] in `dtype` (the product in float32, then
    rounded once). The codes go straight into `dtype` (e4m3 and int8 values are exact there) and are
    scaled in place: no float32 copy of the whole matrix."""
    weight = q.to(dtype)
    return weight.mul_(scale[..., None])


def row_scaled_linear_torch(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., D] @ dequant(Q, s)^T -> [..., O] in x's dtype. The weight is dequantized straight into x's
    dtype (e4m3 and int8 values are exact in it; the product with the float32 scale is rounded once, as
    dequantize_rows_torch does): one copy of 2 bytes a weight for bf16, where going through float32 moved
    about 20. Scaling the output instead would write a float32 [tokens, O] product per call, more bytes
    than the weight at prefill's chunk sizes."""
    weight = q.to(x.dtype)
    weight.mul_(scale[:, None])
    return torch.nn.functional.linear(x, weight)


# -- int4 -------------------------------------------------------------------------------------------


def int4_group_size(width: int) -> int | None:
    """The group size for rows of `width` inputs: the largest of INT4_GROUP_SIZES dividing it, or None."""
    return next((g for g in INT4_GROUP_SIZES if width % g == 0), None)


def quantize_int4_groups(
    weight: torch.Tensor, group: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [..., O, D] -> (packed [..., O, D / 2] uint8, scales [..., O, D / g] bf16, zeros [..., O, D / g]
    bf16). The codes are chosen against the bf16-rounded scale and zero, so that they are the nearest
    levels of the grid the kernels dequantize with."""
    D = weight.shape[-1]
    group = group or int4_group_size(D)
    if group is None or D % group:
        raise ValueError(f"int4 needs rows whose width is a multiple of {INT4_GROUP_SIZES[-1]}, got {D}")
    w = weight.float().reshape(*weight.shape[:-1], D // group, group)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(torch.finfo(torch.bfloat16).tiny).to(torch.bfloat16)
    zero = (lo + 8 * scale.float()).to(torch.bfloat16)
    codes = ((w - zero.float()[..., None]) / scale.float()[..., None] + 8).round_().clamp_(0, 15)
    codes = codes.to(torch.uint8).reshape(*weight.shape[:-1], D)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.contiguous(), scale, zero


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """packed [..., O, D / 2] uint8 -> codes [..., O, D] uint8 in [0, 15]."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


def dequantize_int4_groups(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """(packed, scales, zeros) -> (q - 8) s + z [..., O, D] in `dtype` (float32 arithmetic, one rounding)."""
    codes = unpack_int4(packed)
    D, G = codes.shape[-1], scale.shape[-1]
    grouped = codes.float().reshape(*codes.shape[:-1], G, D // G)
    w = (grouped - 8) * scale.float()[..., None] + zero.float()[..., None]
    return w.reshape(codes.shape).to(dtype)


def int4_linear_torch(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """x [..., D] @ dequant(packed, s, z)^T -> [..., O] in x's dtype."""
    return torch.nn.functional.linear(x, dequantize_int4_groups(packed, scale, zero, x.dtype))
