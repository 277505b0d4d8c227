"""RMS norm (optionally gated by sigmoid(gate), or of a residual sum) in one Triton launch: one program
per row. With a residual, the row is first r + delta, rounded to r's dtype and written back as the new
residual (what `r + delta` then a norm would compute, in one launch instead of two).

Casts follow naive.py exactly: the plain norm rounds the normalised row to x's dtype before the weight
multiplies it (the result in the promoted dtype of weight and x, as PyTorch's product gives); the gated
norm stays in fp32 until the result, cast to x's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_desk.kernels import pdl_launch
from kimi_desk.kernels.grid_dependency import wait_for_previous_kernel


@triton.jit
def inverse_rms(b_x, N: tl.constexpr, eps):
    """1 / sqrt(mean(x^2) + eps) of a float32 row of N values (padding zeros)."""
    return 1.0 / tl.sqrt(tl.sum(b_x * b_x, 0) / N + eps)


@triton.jit
def rms_normed(b_x, b_w, N: tl.constexpr, eps, ROW_DT: tl.constexpr):
    """RMSNorm of a float32 row with float32 weights, rounded as the PyTorch form rounds: the normalised
    row in the row's own dtype ROW_DT, then times the weight (float32; the caller rounds the result)."""
    return (b_x * inverse_rms(b_x, N, eps)).to(ROW_DT).to(tl.float32) * b_w


@triton.jit
def rms_norm_fwd_kernel(
    x,
    gate,
    weight,
    y,
    summed,
    stride_x,
    stride_g,
    eps,
    N: tl.constexpr,
    BN: tl.constexpr,
    GATED: tl.constexpr,
    ADD: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        wait_for_previous_kernel()
    i_r = tl.program_id(0).to(tl.int64)
    o_n = tl.arange(0, BN)
    m_n = o_n < N
    b_x = tl.load(x + i_r * stride_x + o_n, mask=m_n, other=0.0).to(tl.float32)
    if ADD:
        # gate holds delta here; the sum is rounded to x's dtype, as `x + delta` stores it, then normed.
        b_x = b_x + tl.load(gate + i_r * stride_g + o_n, mask=m_n, other=0.0).to(tl.float32)
        b_x = b_x.to(x.dtype.element_ty)
        tl.store(summed + i_r * N + o_n, b_x, mask=m_n)
        b_x = b_x.to(tl.float32)
    b_w = tl.load(weight + o_n, mask=m_n, other=0.0).to(tl.float32)
    if GATED:
        b_g = tl.load(gate + i_r * stride_g + o_n, mask=m_n, other=0.0).to(tl.float32)
        b_y = b_x * inverse_rms(b_x, N, eps) * b_w * tl.sigmoid(b_g)
    else:
        b_y = rms_normed(b_x, b_w, N, eps, x.dtype.element_ty)
    tl.store(y + i_r * N + o_n, b_y.to(y.dtype.element_ty), mask=m_n)


def rms_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    gate: torch.Tensor | None = None,
    delta: torch.Tensor | None = None,
):
    """x [..., N] with a contiguous last axis (rows may be strided, e.g. a slice of a wider tensor);
    gate, if given, x's shape. Returns a new contiguous tensor. With `delta` (x's shape and dtype) returns
    (x + delta, the norm of it), both new."""
    N = x.shape[-1]
    assert weight.shape == (N,) and (gate is None or delta is None)
    rows = x.reshape(-1, N)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    second = gate if gate is not None else delta
    if second is None:
        seconds = rows
        out_dtype = torch.result_type(weight, x)
    else:
        assert second.shape == x.shape and (delta is None or delta.dtype == x.dtype)
        seconds = second.reshape(-1, N)
        if seconds.stride(-1) != 1:
            seconds = seconds.contiguous()
        out_dtype = x.dtype if gate is not None else torch.result_type(weight, x)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    summed = torch.empty(x.shape, dtype=x.dtype, device=x.device) if delta is not None else y
    if rows.shape[0] > 0:
        BN = triton.next_power_of_2(N)
        rms_norm_fwd_kernel[(rows.shape[0],)](
            rows,
            seconds,
            weight,
            y,
            summed,
            rows.stride(0),
            seconds.stride(0),
            float(eps),
            N=N,
            BN=BN,
            GATED=gate is not None,
            ADD=delta is not None,
            num_warps=min(8, max(1, BN // 512)),
            **pdl_launch(x),
        )
    return y if delta is None else (summed, y)
