"""Codes packed into any of the CPU operator's known int4 tile layouts, written from CpuInt4Layout's
description (kernels/quant/cpu.py) independently of `tiles_to_codes`: the tests of the code that reads
tiles check every layout, not only the one this machine's PyTorch packs in."""

import torch

from kimi_desk.kernels.quant.cpu import CpuInt4Layout


def pack_tiles(codes: torch.Tensor, layout: CpuInt4Layout) -> torch.Tensor:
    """codes [..., O, D], one int4 code (0-15) an element, O in whole blocks -> tiles [..., O, D / 2] uint8:
    block by block, input by input, byte j holding the codes of rows j and j + R / 2 (split) or 2j and
    2j + 1, the first in the low half."""
    *lead, O, D = codes.shape
    R = layout.rows
    bytes_out = torch.empty(*lead, O // R, D, R // 2, dtype=torch.uint8)
    for b in range(O // R):
        for j in range(R // 2):
            low, high = (b * R + j, b * R + j + R // 2) if layout.split else (b * R + 2 * j, b * R + 2 * j + 1)
            bytes_out[..., b, :, j] = (codes[..., low, :] | (codes[..., high, :] << 4)).to(torch.uint8)
    return bytes_out.reshape(*lead, O, D // 2)
