"""A few rows times a bfloat16 weight on an AVX2 CPU in one call of C (bf16_cpu.c, compiled at first use by
kernels/native.py): the weight read as stored, float32 sums, where PyTorch's product (oneDNN) costs a
decode step tens of microseconds a matrix whatever its size."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from kimi_desk.kernels import native

SOURCE = Path(__file__).with_name("bf16_cpu.c")
# Rows up to which the call is taken (decode, a few tokens); more (prefill) go to oneDNN's products, which
# reach the cores' arithmetic with that many rows.
MAX_ROWS = 8

_P, _I = ctypes.c_void_p, ctypes.c_int


@functools.cache
def library() -> ctypes.CDLL | None:
    lib = native.library(SOURCE)
    if lib is not None:
        lib.bf16_linear_rows.argtypes = [_P, _I, _I, _P, _I, _I, _P, _I, _I]
        lib.bf16_linear_rows.restype = _I
    return lib


def takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether bf16_linear takes these: on the CPU, a contiguous bfloat16 weight [O, D] with D in 8s, at
    most MAX_ROWS rows of x in float32 or bfloat16, no gradient asked."""
    grads = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return (
        not grads
        and weight.dtype == torch.bfloat16
        and weight.device.type == "cpu"
        and weight.dim() == 2
        and weight.is_contiguous()
        and weight.shape[1] % 8 == 0
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.shape[-1] == weight.shape[1]
        and x.numel() <= MAX_ROWS * weight.shape[1]
        and library() is not None
    )


def bf16_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., D] @ weight^T -> [..., O] in x's dtype, float32 sums (`takes` must hold)."""
    O, D = weight.shape
    rows = x.reshape(-1, D).contiguous()
    y = torch.empty(rows.shape[0], O, dtype=x.dtype)
    bf16 = int(x.dtype == torch.bfloat16)
    status = library().bf16_linear_rows(
        weight.data_ptr(), O, D, rows.data_ptr(), bf16, rows.shape[0], y.data_ptr(), bf16, torch.get_num_threads()
    )
    if status:
        raise MemoryError("out of memory for the bfloat16 product's scratch")
    return y.view(*x.shape[:-1], O)
