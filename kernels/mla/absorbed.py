"""The pieces of an MLA layer around its cached attention, each in one Triton launch (naive.py has their
PyTorch forms, the CPU path and the reference):

- `latents_into_triton`: the new tokens' latents [norm(c) ‖ k_r] from the joined projection's output,
  written straight into the cache's buffer at the cache's position (an int, or the device tensor a
  recorded decode step reads). The PyTorch form is a norm, a concatenation and a copy.
- `absorb_queries_triton`: q [B, T, H, n + R] -> [W_UK^T q_nope ‖ q_rope], the rows the attention
  kernel reads, in its operand dtype. The PyTorch form widens q and kv_b_proj's weight to float32 (16 MB
  of copies a layer at the 48B shapes), multiplies, concatenates and rounds: five launches.
- `values_triton`: the attended latents [B, T, H, L] (float32) through W_UV to the heads' values
  [B, T, H, v] in the model's dtype; the PyTorch form widens the weight, multiplies and rounds.

W_UK and W_UV are read from kv_b_proj's weight as it is stored ([H * (n + v), L]: per head n rows of
W_UK, then v of W_UV), in fp32 sums. Each program reads a [rows, 64] piece of one head's weight, so a
decode step's 32 heads make hundreds of programs rather than 32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_desk.kernels import pdl_launch
from kimi_desk.kernels.grid_dependency import wait_for_previous_kernel
from kimi_desk.kernels.norm.fused import rms_normed


@triton.jit(do_not_specialize=["start", "T"])
def latents_into_fwd_kernel(
    ckv,
    weight,
    buffer,
    start,
    T,
    stride_cb,
    stride_ct,
    stride_bb,
    stride_bt,
    eps,
    L: tl.constexpr,
    R: tl.constexpr,
    BL: tl.constexpr,
    BR: tl.constexpr,
    START_ON_DEVICE: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        wait_for_previous_kernel()
    i_t, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    if START_ON_DEVICE:
        start = tl.load(start).to(tl.int32)
    p_in = ckv + i_b * stride_cb + i_t.to(tl.int64) * stride_ct
    p_out = buffer + i_b * stride_bb + (start + i_t).to(tl.int64) * stride_bt
    o_l = tl.arange(0, BL)
    m_l = o_l < L
    b_c = tl.load(p_in + o_l, mask=m_l, other=0.0).to(tl.float32)
    b_w = tl.load(weight + o_l, mask=m_l, other=0.0).to(tl.float32)
    b_y = rms_normed(b_c, b_w, L, eps, ckv.dtype.element_ty)  # the norm kernel's arithmetic
    tl.store(p_out + o_l, b_y.to(buffer.dtype.element_ty), mask=m_l)
    o_r = tl.arange(0, BR)
    m_r = o_r < R
    b_k = tl.load(p_in + L + o_r, mask=m_r, other=0.0)
    tl.store(p_out + L + o_r, b_k.to(buffer.dtype.element_ty), mask=m_r)


def latents_into_triton(ckv, weight, eps, buffer, start):
    """ckv [B, T, L + R] (the last axis contiguous; rows may be strided) -> buffer[:, start : start + T] =
    [rms_norm(c, weight, eps) ‖ k_r] in the buffer's dtype; `start` an int or a one-element integer
    tensor on the GPU."""
    B, T, width = ckv.shape
    L = weight.shape[0]
    R = width - L
    assert buffer.shape[0] == B and buffer.shape[2] == width and ckv.stride(-1) == 1 and buffer.stride(-1) == 1
    on_device = isinstance(start, torch.Tensor)
    if T == 0:
        return
    latents_into_fwd_kernel[(T, B)](
        ckv,
        weight,
        buffer,
        start,
        T,
        ckv.stride(0),
        ckv.stride(1),
        buffer.stride(0),
        buffer.stride(1),
        float(eps),
        L=L,
        R=R,
        BL=triton.next_power_of_2(L),
        BR=triton.next_power_of_2(R),
        START_ON_DEVICE=on_device,
        num_warps=4,
        **pdl_launch(ckv),
    )


@triton.jit(do_not_specialize=["T"])
def absorb_queries_fwd_kernel(
    q,
    w,
    out,
    T,
    stride_qb,
    stride_qt,
    H: tl.constexpr,
    N: tl.constexpr,
    R: tl.constexpr,
    V: tl.constexpr,
    L: tl.constexpr,
    BN: tl.constexpr,
    BL: tl.constexpr,
    BR: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        wait_for_previous_kernel()
    # Row i_row = (b, t, h) of q and out; latent block i_l.
    i_row, i_l = tl.program_id(0).to(tl.int64), tl.program_id(1)
    i_h = i_row % H
    i_bt = i_row // H
    p_q = q + (i_bt // T) * stride_qb + (i_bt % T) * stride_qt + i_h * (N + R)
    p_out = out + i_row * (L + R)
    o_n = tl.arange(0, BN)
    m_n = o_n < N
    o_l = i_l * BL + tl.arange(0, BL)
    m_l = o_l < L
    b_q = tl.load(p_q + o_n, mask=m_n, other=0.0).to(tl.float32)
    p_w = w + (i_h * (N + V) + o_n).to(tl.int64)[:, None] * L + o_l[None, :]
    b_w = tl.load(p_w, mask=m_n[:, None] & m_l[None, :], other=0.0).to(tl.float32)
    b_o = tl.sum(b_q[:, None] * b_w, 0)
    tl.store(p_out + o_l, b_o.to(out.dtype.element_ty), mask=m_l)
    if i_l == 0:
        o_r = tl.arange(0, BR)
        m_r = o_r < R
        b_r = tl.load(p_q + N + o_r, mask=m_r, other=0.0).to(tl.float32)
        tl.store(p_out + L + o_r, b_r.to(out.dtype.element_ty), mask=m_r)


def absorb_queries_triton(q, kv_b_weight, nope_dim, v_dim, out_dtype):
    """q [B, T, H, n + R] (each token's heads contiguous, tokens may be strided: a slice of the joined
    projection's output), kv_b_proj's weight [H * (n + v), L] -> [B, T, H, L + R] in out_dtype: W_UK^T
    q_nope (fp32 sums) beside q_rope."""
    B, T, H, width = q.shape
    L = kv_b_weight.shape[1]
    R = width - nope_dim
    assert kv_b_weight.shape[0] == H * (nope_dim + v_dim) and kv_b_weight.is_contiguous()
    if q.stride(3) != 1 or q.stride(2) != width:
        q = q.contiguous()
    out = torch.empty(B, T, H, L + R, dtype=out_dtype, device=q.device)
    if B * T == 0:
        return out
    BL = min(64, triton.next_power_of_2(L))
    absorb_queries_fwd_kernel[(B * T * H, triton.cdiv(L, BL))](
        q,
        kv_b_weight,
        out,
        T,
        q.stride(0),
        q.stride(1),
        H=H,
        N=nope_dim,
        R=R,
        V=v_dim,
        L=L,
        BN=triton.next_power_of_2(nope_dim),
        BL=BL,
        BR=triton.next_power_of_2(R),
        num_warps=4,
        **pdl_launch(q),
    )
    return out


@triton.jit
def values_fwd_kernel(
    attended,
    w,
    out,
    H: tl.constexpr,
    N: tl.constexpr,
    V: tl.constexpr,
    L: tl.constexpr,
    BV: tl.constexpr,
    BL: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        wait_for_previous_kernel()
    i_row, i_v = tl.program_id(0).to(tl.int64), tl.program_id(1)
    i_h = i_row % H
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    p_w = w + (i_h * (N + V) + N + o_v).to(tl.int64)[:, None] * L
    b_o = tl.zeros([BV], dtype=tl.float32)
    for l0 in tl.static_range(0, L, BL):
        o_l = l0 + tl.arange(0, BL)
        m_l = o_l < L
        b_a = tl.load(attended + i_row * L + o_l, mask=m_l, other=0.0)
        b_w = tl.load(p_w + o_l[None, :], mask=m_v[:, None] & m_l[None, :], other=0.0).to(tl.float32)
        b_o += tl.sum(b_w * b_a[None, :], 1)
    tl.store(out + i_row * V + o_v, b_o.to(out.dtype.element_ty), mask=m_v)


def values_triton(attended, kv_b_weight, nope_dim, v_dim, out_dtype):
    """attended [B, T, H, L] float32, kv_b_proj's weight [H * (n + v), L] -> W_UV attended [B, T, H, v] in
    out_dtype (fp32 sums)."""
    B, T, H, L = attended.shape
    assert kv_b_weight.shape == (H * (nope_dim + v_dim), L) and kv_b_weight.is_contiguous()
    assert attended.dtype == torch.float32
    attended = attended.contiguous()
    out = torch.empty(B, T, H, v_dim, dtype=out_dtype, device=attended.device)
    if B * T == 0:
        return out
    BV = min(32, triton.next_power_of_2(v_dim))
    values_fwd_kernel[(B * T * H, triton.cdiv(v_dim, BV))](
        attended,
        kv_b_weight,
        out,
        H=H,
        N=nope_dim,
        V=v_dim,
        L=L,
        BV=BV,
        BL=min(128, triton.next_power_of_2(L)),
        num_warps=4,
        **pdl_launch(attended),
    )
    return out
