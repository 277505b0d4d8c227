"""The model's RMS norms on an AVX2 CPU (rms_avx2.c, compiled at first use by kernels/native.py): naive.py's
formulas and casts in one call a norm (with the residual add before it, where asked), where PyTorch takes
seven to ten small operations, which a decode step pays for in dispatch more than in arithmetic."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from kimi_desk.kernels import native

SOURCE = Path(__file__).with_name("rms_avx2.c")
_P, _I, _L = ctypes.c_void_p, ctypes.c_int, ctypes.c_long


@functools.cache
def library() -> ctypes.CDLL | None:
    lib = native.library(SOURCE)
    if lib is not None:
        lib.rms_norm_rows.argtypes = [_P, _P, _P, _P, _I, _I, ctypes.c_float, _I, _P, _I]
        lib.rms_norm_rows.restype = _I
        lib.rms_norm_into_rows.argtypes = [_P, _L, _P, _I, _I, _I, ctypes.c_float, _I, _P, _L, _P]
        lib.rms_norm_into_rows.restype = _I
    return lib


def takes(x: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor | None = None) -> bool:
    """Whether rms_norm_avx2 takes these: on the CPU, x (and delta) and the weight all float32 or all
    bfloat16, x's rows contiguous, a weight per column, no gradient asked (the call has no backward)."""
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, delta))
    return (
        not grads
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and weight.dtype == x.dtype
        and weight.numel() == x.shape[-1]
        and weight.is_contiguous()
        and x.is_contiguous()
        and (delta is None or (delta.dtype == x.dtype and delta.shape == x.shape and delta.is_contiguous()))
        and library() is not None
    )


def rms_norm_avx2(x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None):
    """naive.py's rms_norm_torch(x, weight, eps), or with delta, (x + delta, its norm) as add_rms_norm
    gives them, in one call (`takes` must hold)."""
    D = x.shape[-1]
    y = torch.empty_like(x)
    summed = None if delta is None else torch.empty_like(x)
    status = library().rms_norm_rows(
        x.data_ptr(),
        None if delta is None else delta.data_ptr(),
        None if summed is None else summed.data_ptr(),
        weight.data_ptr(),
        x.numel() // D,
        D,
        eps,
        int(x.dtype == torch.bfloat16),
        y.data_ptr(),
        torch.get_num_threads(),
    )
    if status:
        raise MemoryError("out of memory for the RMS norm's scratch row")
    return y if delta is None else (summed, y)


def takes_latents(ckv: torch.Tensor, weight: torch.Tensor, cache_dtype: torch.dtype) -> bool:
    """Whether latents_into takes these: ckv [B, T, D + tail], the weight [D] and the cache all in one
    dtype (float32 or bfloat16), on the CPU, ckv's rows contiguous."""
    return (
        ckv.device.type == "cpu"
        and ckv.dtype in (torch.float32, torch.bfloat16)
        and cache_dtype == ckv.dtype == weight.dtype
        and weight.is_contiguous()
        and ckv.stride(-1) == 1
        and not (torch.is_grad_enabled() and ckv.requires_grad)
        and library() is not None
    )


def latents_into(ckv: torch.Tensor, weight: torch.Tensor, eps: float, buffer: torch.Tensor, start) -> None:
    """[rms_norm(c) ‖ k_r] of ckv [B, T, D + R] (D = weight's length) into buffer [B, capacity, D + R] at
    rows start .. start + T, in one call a sequence. `start` may be a one-element int64 tensor on the CPU,
    read by the kernel when it runs (a recorded step's cache length)."""
    B, T, width = ckv.shape
    D = weight.numel()
    at = native.count_at(start)
    for b in range(B):
        status = library().rms_norm_into_rows(
            ckv[b].data_ptr(),
            ckv.stride(1),
            weight.data_ptr(),
            T,
            D,
            width - D,
            eps,
            int(ckv.dtype == torch.bfloat16),
            buffer[b].data_ptr(),
            buffer.stride(1),
            at,
        )
        if status:
            raise MemoryError("out of memory for the RMS norm's scratch row")
