"""The sampled token's choice under top-p on the CPU in one call of C (top_p_cpu.c, compiled at first use
by kernels/native.py): naive.py's definition bit for bit, in three passes over the weights and no sort,
where PyTorch's operators (naive.py's choose_sampled_cpu) take milliseconds of a CPU decode step."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from kimi_desk.kernels import native

SOURCE = Path(__file__).with_name("top_p_cpu.c")
_P = ctypes.c_void_p


@functools.cache
def library() -> ctypes.CDLL | None:
    lib = native.library(SOURCE)
    if lib is not None:
        lib.top_p_choice.argtypes = [_P, ctypes.c_long, ctypes.c_float, _P, _P]
        lib.top_p_choice.restype = ctypes.c_int
    return lib


def takes(weights: torch.Tensor, uniform: torch.Tensor) -> bool:
    """Whether choose_sampled_c takes these: float32 weights [V] and a float64 draw [1], contiguous, on the CPU."""
    return (
        weights.device.type == "cpu"
        and weights.dtype == torch.float32
        and weights.dim() == 1
        and weights.is_contiguous()
        and uniform.device.type == "cpu"
        and uniform.dtype == torch.float64
        and uniform.numel() == 1
        and library() is not None
    )


def choose_sampled_c(weights: torch.Tensor, p: float, uniform: torch.Tensor) -> torch.Tensor:
    """naive.py's choose_sampled_torch(weights, p, uniform) as a [1] int64 tensor (`takes` must hold). The
    draw is read and the token written through their memory: no host value becomes a tensor."""
    token = torch.empty(1, dtype=torch.int64)
    if library().top_p_choice(weights.data_ptr(), weights.numel(), p, uniform.data_ptr(), token.data_ptr()):
        raise MemoryError("out of memory for the top-p choice's scratch")
    return token
