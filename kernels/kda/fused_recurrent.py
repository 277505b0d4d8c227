"""Kimi Delta Attention decode: the token-by-token recurrence in one Triton launch.

Each program owns one [K, BV] tile of one head's state in fp32 registers and walks the tokens in order,
so the state is read once and written once whatever T is. Per token (kernels/kda/naive.py):
    S <- S * exp(g_t)[:, None];  u = beta_t (v_t - S^T k_t);  S <- S + k_t u^T;  o_t = S^T (scale q_t)
Every program needs the whole K axis of its tile (S^T k sums over K), so the grid splits V only.

Optional fusions for the decode step of the real layer (all off by default, which keeps the contract of
`kimi_desk.kernels.kda.fused_recurrent_kda`):
  - A_log [H] and dt_bias [H*K]: g is the raw gate input, turned into -exp(A_log) * softplus(g + dt_bias)
    in the kernel (Kimi Linear's unbounded gate, softplus threshold 20 as in fla);
  - use_qk_l2norm_in_kernel: q and k are L2-normalised in the kernel (x / sqrt(sum x^2 + 1e-6), fla's eps);
  - use_beta_sigmoid_in_kernel: beta holds logits;
  - inplace_final_state: the final state overwrites initial_state, so a CUDA graph can replay the step on
    fixed buffers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_desk.kernels import pdl_launch
from kimi_desk.kernels.grid_dependency import wait_for_previous_kernel
from kimi_desk.kernels.kda.gate import log_decay


@triton.jit
def state_tile(
    h0, i_bh, i_v, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_INITIAL_STATE: tl.constexpr
):
    """The tile of BV columns (block i_v) of head i_bh's state ([B, H, K, V]: K rows, V contiguous) that a
    program holds, here and in chunk.py's scan: the offsets and masks of its K and V axes, its offsets and
    mask in the state (for the final store), and its initial value in fp32 (h0's, or zeros)."""
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    o_h = i_bh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    if USE_INITIAL_STATE:
        b_h = tl.load(h0 + o_h, mask=m_h, other=0.0).to(tl.float32)
    else:
        b_h = tl.zeros([BK, BV], dtype=tl.float32)
    return o_k, o_v, m_k, m_v, o_h, m_h, b_h


@triton.jit
def fused_recurrent_kda_fwd_kernel(
    q,
    k,
    v,
    g,
    beta,
    A_log,
    dt_bias,
    o,
    h0,
    ht,
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
    USE_GATE_IN_KERNEL: tl.constexpr,
    USE_QK_L2NORM_IN_KERNEL: tl.constexpr,
    USE_BETA_SIGMOID_IN_KERNEL: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        wait_for_previous_kernel()
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    # int64 before any multiplication by T: B * T * H * K overflows int32 at long contexts.
    bos = i_b.to(tl.int64) * T
    o_k, o_v, m_k, m_v, o_h, m_h, b_h = state_tile(h0, i_bh, i_v, K, V, BK, BV, USE_INITIAL_STATE)
    p_q = q + (bos * H + i_h) * K + o_k
    p_k = k + (bos * H + i_h) * K + o_k
    p_g = g + (bos * H + i_h) * K + o_k
    p_v = v + (bos * H + i_h) * V + o_v
    p_beta = beta + bos * H + i_h
    p_o = o + (bos * H + i_h) * V + o_v

    if USE_GATE_IN_KERNEL:
        b_A = -tl.exp(tl.load(A_log + i_h).to(tl.float32))
        b_bias = tl.load(dt_bias + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)

    for _ in range(0, T):
        b_q = tl.load(p_q, mask=m_k, other=0.0).to(tl.float32)
        b_k = tl.load(p_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(p_v, mask=m_v, other=0.0).to(tl.float32)
        b_g = tl.load(p_g, mask=m_k, other=0.0).to(tl.float32)
        b_beta = tl.load(p_beta).to(tl.float32)
        if USE_QK_L2NORM_IN_KERNEL:
            b_q = b_q / tl.sqrt(tl.sum(b_q * b_q) + 1e-6)
            b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + 1e-6)
        if USE_GATE_IN_KERNEL:
            b_g = log_decay(b_g + b_bias, b_A)
        if USE_BETA_SIGMOID_IN_KERNEL:
            b_beta = tl.sigmoid(b_beta)
        # exp(g) <= 1 for any g <= 0, so no gate can overflow the state; very negative ones just zero a row.
        b_h = b_h * tl.exp(b_g)[:, None]
        b_u = b_beta * (b_v - tl.sum(b_h * b_k[:, None], 0))
        b_h = b_h + b_k[:, None] * b_u[None, :]
        b_o = tl.sum(b_h * (b_q * scale)[:, None], 0)
        tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=m_v)

        p_q += H * K
        p_k += H * K
        p_g += H * K
        p_v += H * V
        p_beta += H
        p_o += H * V

    if STORE_FINAL_STATE:
        tl.store(ht + o_h, b_h.to(ht.dtype.element_ty), mask=m_h)


def _launch_config(n_programs_per_bv32: int, V: int):
    """(BV, warps). Few heads in flight (batch 1): split V finer so that the step still fills the SMs.
    Measured on an H100, 20 steps in a CUDA graph at H = 32, K = V = 128: BV 16 / 4 warps best at B = 1,
    BV 32 / 2 warps best at B = 8."""
    if n_programs_per_bv32 >= 512:
        bv, warps = 32, 2
    else:
        bv, warps = 16, 4
    return min(bv, triton.next_power_of_2(V)), warps


def fused_recurrent_kda_triton(
    q,
    k,
    v,
    g,
    beta,
    scale=None,
    initial_state=None,
    output_final_state=False,
    *,
    A_log=None,
    dt_bias=None,
    use_qk_l2norm_in_kernel=False,
    use_beta_sigmoid_in_kernel=False,
    inplace_final_state=False,
    final_state_out=None,
    out=None,
    block_v=None,
    num_warps=None,
):
    """o [B, T, H, V] in q's dtype and the final state [B, H, K, V] (fp32) or None.

    With `inplace_final_state` the final state is written into `initial_state` (which must then be given,
    contiguous) and returned, with `final_state_out` into that buffer ([B, H, K, V] fp32, contiguous);
    `out` may name a preallocated output. These keep every buffer fixed, as CUDA graph capture needs.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    assert k.shape == q.shape and g.shape == q.shape and v.shape[:3] == (B, T, H) and beta.shape == (B, T, H)
    assert K <= 256, "one program holds the whole K axis of its state tile"
    scale = K**-0.5 if scale is None else float(scale)
    use_gate = A_log is not None
    if use_gate:
        assert dt_bias is not None and dt_bias.numel() == H * K and A_log.numel() == H
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))

    if initial_state is not None:
        assert initial_state.shape == (B, H, K, V)
        if not inplace_final_state:
            initial_state = initial_state.contiguous()
    if inplace_final_state:
        assert initial_state is not None and initial_state.is_contiguous()
        final_state = initial_state
    elif final_state_out is not None:
        assert final_state_out.shape == (B, H, K, V) and final_state_out.is_contiguous()
        assert final_state_out.dtype == torch.float32
        final_state = final_state_out
    elif output_final_state:
        final_state = q.new_empty(B, H, K, V, dtype=torch.float32)
    else:
        final_state = None
    if out is None:
        out = torch.empty(B, T, H, V, dtype=q.dtype, device=q.device)
    if T == 0:
        if final_state is not None and final_state is not initial_state:
            final_state.copy_(initial_state) if initial_state is not None else final_state.zero_()
        return out, final_state

    BK = triton.next_power_of_2(K)
    default_bv, default_warps = _launch_config(B * H * triton.cdiv(V, 32), V)
    BV = block_v or default_bv
    num_warps = num_warps or default_warps
    grid = (triton.cdiv(V, BV), B * H)
    fused_recurrent_kda_fwd_kernel[grid](
        q,
        k,
        v,
        g,
        beta,
        A_log if use_gate else q,
        dt_bias if use_gate else q,
        out,
        initial_state if initial_state is not None else q,
        final_state if final_state is not None else q,
        scale,
        T,
        H=H,
        K=K,
        V=V,
        BK=BK,
        BV=BV,
        USE_INITIAL_STATE=initial_state is not None,
        STORE_FINAL_STATE=final_state is not None,
        USE_GATE_IN_KERNEL=use_gate,
        USE_QK_L2NORM_IN_KERNEL=use_qk_l2norm_in_kernel,
        USE_BETA_SIGMOID_IN_KERNEL=use_beta_sigmoid_in_kernel,
        num_warps=num_warps,
        **pdl_launch(q),
    )
    return out, final_state
