"""The KDA layer's three short convolutions (q, k, v) for a few new tokens, in one Triton launch, the
windows updated in place (or written to another buffer of the same shape, the old one kept).

Per channel c of each stream (kimi-linear-spec.md §3.2 step 2, engine/kda.py's ShortConv):
    y_t[c] = SiLU(w[c, 3] x_t[c] + w[c, 0] x_{t-3}[c] + w[c, 1] x_{t-2}[c] + w[c, 2] x_{t-1}[c])
with the window [B, 3, P, 3] holding the three inputs before the first new token, one row per stream.
Each program owns a block of channels of one sequence, carries the window through the tokens in
registers and writes it back at the end: the window keeps its storage, as a replayed CUDA graph needs.
The width is fixed at 4, the only one Kimi Linear uses; the sums run in the PyTorch form's order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_desk.kernels import pdl_launch
from kimi_desk.kernels.grid_dependency import wait_for_previous_kernel


@triton.jit
def _short_conv_stream(x, w, window, window_out, y, i_b, o_p, m_p, T, P: tl.constexpr):
    """One stream: x, y [B, T, P]; w [P, 1, 4]; window and window_out already offset to this (sequence,
    stream), [P, 3]."""
    p_x = x + i_b * T * P + o_p
    p_y = y + i_b * T * P + o_p
    p_win = window + o_p * 3
    p_out = window_out + o_p * 3
    b_w0 = tl.load(w + o_p * 4 + 0, mask=m_p, other=0.0).to(tl.float32)
    b_w1 = tl.load(w + o_p * 4 + 1, mask=m_p, other=0.0).to(tl.float32)
    b_w2 = tl.load(w + o_p * 4 + 2, mask=m_p, other=0.0).to(tl.float32)
    b_w3 = tl.load(w + o_p * 4 + 3, mask=m_p, other=0.0).to(tl.float32)
    b_h0 = tl.load(p_win + 0, mask=m_p, other=0.0).to(tl.float32)
    b_h1 = tl.load(p_win + 1, mask=m_p, other=0.0).to(tl.float32)
    b_h2 = tl.load(p_win + 2, mask=m_p, other=0.0).to(tl.float32)
    for t in range(0, T):
        b_x = tl.load(p_x + t * P, mask=m_p, other=0.0).to(tl.float32)
        b_y = b_x * b_w3 + b_h0 * b_w0 + b_h1 * b_w1 + b_h2 * b_w2
        tl.store(p_y + t * P, (b_y * tl.sigmoid(b_y)).to(p_y.dtype.element_ty), mask=m_p)
        b_h0 = b_h1
        b_h1 = b_h2
        b_h2 = b_x
    # Threads that hold the same channel (the layout may replicate a short block) must all have read the
    # old window before any of them overwrites it.
    tl.debug_barrier()
    tl.store(p_out + 0, b_h0.to(p_out.dtype.element_ty), mask=m_p)
    tl.store(p_out + 1, b_h1.to(p_out.dtype.element_ty), mask=m_p)
    tl.store(p_out + 2, b_h2.to(p_out.dtype.element_ty), mask=m_p)


@triton.jit
def short_conv_update_fwd_kernel(
    x_q,
    x_k,
    x_v,
    w_q,
    w_k,
    w_v,
    window,
    window_out,
    y_q,
    y_k,
    y_v,
    T,
    P: tl.constexpr,
    BP: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        wait_for_previous_kernel()
    i_p, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_p = i_p * BP + tl.arange(0, BP)
    m_p = o_p < P
    # window [B, 3, P, 3]: streams q, k, v of sequence i_b.
    p_win = window + i_b * 3 * P * 3
    p_out = window_out + i_b * 3 * P * 3
    _short_conv_stream(x_q, w_q, p_win, p_out, y_q, i_b, o_p, m_p, T, P)
    _short_conv_stream(x_k, w_k, p_win + P * 3, p_out + P * 3, y_k, i_b, o_p, m_p, T, P)
    _short_conv_stream(x_v, w_v, p_win + 2 * P * 3, p_out + 2 * P * 3, y_v, i_b, o_p, m_p, T, P)


def short_conv_update_triton(xs, weights, window, block_p: int = 128, window_out=None):
    """xs: (x_q, x_k, x_v), each [B, T, P]; weights: their [P, 1, 4] taps; window [B, 3, P, 3], contiguous,
    advanced by T tokens in place, or into `window_out` (same shape, contiguous) with `window` left as it
    was. Returns (y_q, y_k, y_v), SiLU(conv), each [B, T, P] in x's dtype."""
    B, T, P = xs[0].shape
    assert all(x.shape == (B, T, P) for x in xs) and all(w.shape == (P, 1, 4) for w in weights)
    window_out = window if window_out is None else window_out
    assert all(w.shape == (B, 3, P, 3) and w.is_contiguous() for w in (window, window_out))
    xs = [x.contiguous() for x in xs]
    weights = [w.contiguous() for w in weights]
    ys = [torch.empty_like(x) for x in xs]
    if T == 0:
        if window_out is not window:
            window_out.copy_(window)
        return tuple(ys)
    BP = min(block_p, triton.next_power_of_2(P))
    short_conv_update_fwd_kernel[(triton.cdiv(P, BP), B)](
        *xs,
        *weights,
        window,
        window_out,
        *ys,
        T,
        P=P,
        BP=BP,
        num_warps=max(1, min(4, BP // 128)),
        **pdl_launch(window),
    )
    return tuple(ys)
