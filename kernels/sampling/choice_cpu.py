"""A token's choice on the CPU in one call of C (choice_cpu.c, compiled at first use by kernels/native.py),
bit for bit what PyTorch gives: greedy as torch.argmax, and under top-p naive.py's definition in three
passes over the weights and no sort, where PyTorch's operators (torch.argmax element by element;
naive.py's choose_sampled_cpu) take 0.3 to several milliseconds of a CPU decode step."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from kimi_desk.kernels import native

SOURCE = Path(__file__).with_name("choice_cpu.c")
_P = ctypes.c_void_p


@functools.cache
def library() -> ctypes.CDLL | None:
    lib = native.library(SOURCE)
    if lib is not None:
        lib.top_p_choice.argtypes = [_P, ctypes.c_long, ctypes.c_float, _P, _P]
        lib.top_p_choice.restype = ctypes.c_int
        lib.first_largest.argtypes = [_P, ctypes.c_long, _P]
        lib.first_largest.restype = None
    return lib


def takes(row: torch.Tensor, uniform: torch.Tensor | None = None) -> bool:
    """Whether the calls below take these: one float32 row [V] (logits, or weights) and, for a sampled
    choice, a float64 draw [1], contiguous, on the CPU."""
    return (
        row.device.type == "cpu"
        and row.dtype == torch.float32
        and row.dim() == 1
        and row.numel() > 0
        and row.is_contiguous()
        and (
            uniform is None
            or (uniform.device.type == "cpu" and uniform.dtype == torch.float64 and uniform.numel() == 1)
        )
        and library() is not None
    )


def choose_greedy_c(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax(logits).view(1) (`takes` must hold): the first largest, or the first NaN."""
    token = torch.empty(1, dtype=torch.int64)
    library().first_largest(logits.data_ptr(), logits.numel(), token.data_ptr())
    return token


def choose_sampled_c(weights: torch.Tensor, p: float, uniform: torch.Tensor) -> torch.Tensor:
    """naive.py's choose_sampled_torch(weights, p, uniform) as a [1] int64 tensor (`takes` must hold). The
    draw is read and the token written through their memory: no host value becomes a tensor."""
    token = torch.empty(1, dtype=torch.int64)
    if library().top_p_choice(weights.data_ptr(), weights.numel(), p, uniform.data_ptr(), token.data_ptr()):
        raise MemoryError("out of memory for the top-p choice's scratch")
    return token
