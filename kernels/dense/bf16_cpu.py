"""A few rows times a bfloat16 weight on an AVX2 CPU in one call of C (bf16_cpu.c, compiled at first use by
kernels/native.py): the weight read as stored, float32 sums, where PyTorch's product (oneDNN) costs a
decode step tens of microseconds a matrix whatever its size. And one token through its chosen bfloat16
routed experts in one call (`experts_one_token`, bfloat16 or float32 experts)."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from kimi_desk.kernels import native

SOURCE = Path(__file__).with_name("bf16_cpu.c")
# Experts a token's call takes at most (bf16_cpu.c's array of choices).
MAX_EXPERTS = 64
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
        lib.experts_one_token.argtypes = [_P, _I, _I, _I, _P, _P, _P, _I, _P, _P, _I, _P, _I, _I]
        lib.experts_one_token.restype = _I
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


def experts_take(x: torch.Tensor, ids: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> bool:
    """Whether experts_one_token takes these: one token x [1, D] (float32 or bfloat16) on the CPU, at most
    MAX_EXPERTS choices, stacks w1, w3 [E, I, D] and w2 [E, D, I] all bfloat16 or all float32,
    contiguous, I and D in 8s."""
    if x.dim() != 2 or x.shape[0] != 1 or w1.dim() != 3:
        return False
    E, I, D = w1.shape
    grads = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w1, w2, w3))
    return (
        not grads
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.shape[1] == D
        and ids.numel() <= MAX_EXPERTS
        and w1.dtype in (torch.bfloat16, torch.float32)
        and all(w.dtype == w1.dtype and w.device.type == "cpu" and w.is_contiguous() for w in (w1, w2, w3))
        and w3.shape == w1.shape
        and w2.shape == (E, D, I)
        and I % 8 == 0
        and D % 8 == 0
        and library() is not None
    )


def experts_one_token(x, ids, weights, w1, w2, w3, out_dtype=torch.float32) -> torch.Tensor:
    """One token x [1, D] through its chosen experts ids [k] (int64, < 0 skipped), mixed by weights [k]:
    sum_j weights[j] * w2[e] (silu(w1[e] x) * (w3[e] x)), float32 throughout, [1, D] in out_dtype
    (float32 or bfloat16, rounded once). `experts_take` must hold."""
    D, I = x.shape[1], w1.shape[1]
    x = x.contiguous()
    ids = ids.reshape(-1).to(torch.int64).contiguous()
    weights = weights.reshape(-1).to(torch.float32).contiguous()
    out = torch.empty(1, D, dtype=out_dtype)
    status = library().experts_one_token(
        x.data_ptr(),
        int(x.dtype == torch.bfloat16),
        D,
        I,
        w1.data_ptr(),
        w3.data_ptr(),
        w2.data_ptr(),
        int(w1.dtype == torch.bfloat16),
        ids.data_ptr(),
        weights.data_ptr(),
        ids.numel(),
        out.data_ptr(),
        int(out_dtype == torch.bfloat16),
        torch.get_num_threads(),
    )
    if status:
        raise MemoryError("out of memory for the experts' scratch")
    return out
