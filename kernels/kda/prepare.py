"""The KDA layer's prefill inputs prepared in one Triton pass over the rows (token, head), for the plain
chunked prefill (chunk.py) to read.

From the layer's raw projections it writes what `chunk_kda` takes:
    q, k  <- x / sqrt(sum x^2 + 1e-6)               (fla's L2 norm; fp32 math, stored in the input dtype)
    g     <- -exp(A_log) * softplus(x_g + dt_bias)  (Kimi Linear's log decay, fp32, gate.log_decay)
    beta  <- sigmoid(beta_logits)                   (fp32, as fla's fused_beta_sigmoid stores it)
Each program owns a block of rows and every channel of them (K <= 256), so each row's sum of squares is
one reduction in registers and every input element is read once and every output written once. The inputs
may be strided views (the layer's projections are column slices of one product): each takes its own
batch, token and head strides, channels contiguous, so no copy is made before the pass.

The layer's GPU prefill is this pass, then chunk.py's kernels on its outputs: the same work inside the
chunk kernels made the intra kernel spill registers heavily, and the whole call slower (BENCHMARKS.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_desk.kernels import pdl_launch
from kimi_desk.kernels.grid_dependency import wait_for_previous_kernel
from kimi_desk.kernels.kda.gate import log_decay

# Rows times channels per program: 32 rows of 128 channels, 16 of 256.
TILE_ELEMENTS = 4096


@triton.jit
def _row_offsets(o_r, T, H: tl.constexpr, stride_b, stride_t, stride_h):
    """Element offsets (int64) of rows o_r (b, t, h flattened, h fastest) in a tensor of these strides."""
    o_bt = o_r // H
    return (o_bt // T) * stride_b + (o_bt % T) * stride_t + (o_r % H) * stride_h


@triton.jit
def _unit_rows(src, dst, o_src, o_dst, o_k, m_rk):
    """Rows of src scaled to unit L2 norm (eps 1e-6 inside the square root, as fla's l2norm_fwd), into dst."""
    b_x = tl.load(src + o_src[:, None] + o_k[None, :], mask=m_rk, other=0.0).to(tl.float32)
    b_r = 1.0 / tl.sqrt(tl.sum(b_x * b_x, 1) + 1e-6)
    tl.store(dst + o_dst[:, None] + o_k[None, :], (b_x * b_r[:, None]).to(dst.dtype.element_ty), mask=m_rk)


@triton.jit(do_not_specialize=["R", "T"])
def prepare_kda_fwd_kernel(
    q,
    k,
    x,
    beta,
    A_log,
    dt_bias,
    q_out,
    k_out,
    g_out,
    beta_out,
    R,
    T,
    stride_q_b,
    stride_q_t,
    stride_q_h,
    stride_k_b,
    stride_k_t,
    stride_k_h,
    stride_x_b,
    stride_x_t,
    stride_x_h,
    stride_beta_b,
    stride_beta_t,
    stride_beta_h,
    H: tl.constexpr,
    K: tl.constexpr,
    BR: tl.constexpr,
    BK: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        wait_for_previous_kernel()
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_k = tl.arange(0, BK)
    m_r = o_r < R
    m_rk = m_r[:, None] & (o_k < K)[None, :]
    # The outputs are contiguous [B, T, H, *]: row r starts at r * K (r for beta).
    o_out = o_r * K

    _unit_rows(q, q_out, _row_offsets(o_r, T, H, stride_q_b, stride_q_t, stride_q_h), o_out, o_k, m_rk)
    _unit_rows(k, k_out, _row_offsets(o_r, T, H, stride_k_b, stride_k_t, stride_k_h), o_out, o_k, m_rk)

    i_h = o_r % H
    o_x = _row_offsets(o_r, T, H, stride_x_b, stride_x_t, stride_x_h)
    b_x = tl.load(x + o_x[:, None] + o_k[None, :], mask=m_rk, other=0.0).to(tl.float32)
    b_bias = tl.load(dt_bias + i_h[:, None] * K + o_k[None, :], mask=m_rk, other=0.0).to(tl.float32)
    b_A = -tl.exp(tl.load(A_log + i_h, mask=m_r, other=0.0).to(tl.float32))
    tl.store(g_out + o_out[:, None] + o_k[None, :], log_decay(b_x + b_bias, b_A[:, None]), mask=m_rk)

    o_beta = _row_offsets(o_r, T, H, stride_beta_b, stride_beta_t, stride_beta_h)
    b_beta = tl.load(beta + o_beta, mask=m_r, other=0.0).to(tl.float32)
    tl.store(beta_out + o_r, tl.sigmoid(b_beta), mask=m_r)


def prepare_kda_triton(q, k, x, A_log, dt_bias, beta_logits, *, rows_per_program=None, num_warps=4):
    """q, k, x [B, T, H, K] (channels contiguous, any other strides), A_log [H] (any shape of H elements),
    dt_bias [H * K], beta_logits [B, T, H] -> (q, k, g, beta), contiguous: q and k L2-normalised in their
    dtype, g [B, T, H, K] and beta [B, T, H] in fp32. `rows_per_program` overrides the launch's block of
    rows (a power of two), for benchmarks."""
    B, T, H, K = q.shape
    assert k.shape == q.shape and x.shape == q.shape and beta_logits.shape == (B, T, H)
    assert A_log.numel() == H and dt_bias.numel() == H * K and K <= 256
    q, k, x = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, x))
    A_log, dt_bias = A_log.reshape(H).contiguous(), dt_bias.reshape(H * K).contiguous()
    q_out = torch.empty(B, T, H, K, dtype=q.dtype, device=q.device)
    k_out = torch.empty(B, T, H, K, dtype=k.dtype, device=q.device)
    g = torch.empty(B, T, H, K, dtype=torch.float32, device=q.device)
    beta = torch.empty(B, T, H, dtype=torch.float32, device=q.device)
    R = B * T * H
    if R == 0:
        return q_out, k_out, g, beta
    BK = max(16, triton.next_power_of_2(K))
    BR = rows_per_program or max(1, TILE_ELEMENTS // BK)
    prepare_kda_fwd_kernel[(triton.cdiv(R, BR),)](
        q,
        k,
        x,
        beta_logits,
        A_log,
        dt_bias,
        q_out,
        k_out,
        g,
        beta,
        R,
        T,
        *q.stride()[:3],
        *k.stride()[:3],
        *x.stride()[:3],
        *beta_logits.stride(),
        H=H,
        K=K,
        BR=BR,
        BK=BK,
        num_warps=num_warps,
        **pdl_launch(q),
    )
    return q_out, k_out, g, beta
