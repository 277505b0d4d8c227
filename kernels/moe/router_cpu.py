"""A MoE router's choice for a few tokens (decode) on an AVX2 CPU in one call of C (router_cpu.c, compiled at
first use by kernels/native.py): the float32 logits and naive.py's route_topk_torch on them, where PyTorch
takes some fifteen operators a MoE layer, each costing a decode step more in dispatch than in arithmetic.
Ids come in choice order (largest biased score first, ties to the lowest id), as router.py's Triton kernel
gives them; torch.topk(sorted=False) promises no order, and the set of ids and each id's weight agree."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from kimi_desk.kernels import native

SOURCE = Path(__file__).with_name("router_cpu.c")
_P, _I, _L = ctypes.c_void_p, ctypes.c_int, ctypes.c_long


@functools.cache
def library() -> ctypes.CDLL | None:
    lib = native.library(SOURCE)
    if lib is not None:
        lib.route_rows.argtypes = [_P, _I, _L, _L, _P, _L, _P, _I, _I, _I, ctypes.c_float, _I, _L, _P, _P, _I]
        lib.route_rows.restype = _I
    return lib


def takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> bool:
    """Whether route_cpu takes these: on the CPU, x [N, D] float32 or bfloat16 with contiguous rows, the
    weight [E, D] and the bias [E] float32 and contiguous, no gradient asked."""
    grads = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, bias))
    return (
        not grads
        and x.device.type == "cpu"
        and x.dim() == 2
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.is_contiguous()
        and weight.dtype == bias.dtype == torch.float32
        and weight.dim() == 2
        and weight.shape[1] == x.shape[1]
        and bias.shape == weight.shape[:1]
        and weight.is_contiguous()
        and bias.is_contiguous()
        and library() is not None
    )


def route_cpu(x, weight, bias, top_k, activation, renormalize, scaling, weights_from_biased=False, append=None):
    """route_topk_torch(x.float() @ weight.t(), bias, ...) in one call (`takes` must hold): (ids [N, k]
    int64, weights [N, k] float32), k = top_k (+ 1 with `append`)."""
    N, D = x.shape
    E = weight.shape[0]
    if not 0 < top_k <= E:
        raise ValueError(f"top_k {top_k} for {E} experts")
    k = top_k + (append is not None)
    ids = torch.empty(N, k, dtype=torch.int64)
    weights = torch.empty(N, k, dtype=torch.float32)
    status = library().route_rows(
        x.data_ptr(),
        int(x.dtype == torch.bfloat16),
        N,
        D,
        weight.data_ptr(),
        E,
        bias.data_ptr(),
        top_k,
        int(activation == "sigmoid"),
        int(renormalize),
        scaling,
        int(weights_from_biased),
        -1 if append is None else append,
        ids.data_ptr(),
        weights.data_ptr(),
        torch.get_num_threads(),
    )
    if status:
        raise MemoryError("out of memory for the router's scratch")
    return ids, weights
