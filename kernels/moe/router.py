"""A MoE router's expert choice for a few tokens (decode) in one Triton launch.

naive.route_topk_torch is the reference and the path for everything else (kernels/moe's `route_topk`
dispatches). After the router's logits GEMV it runs sigmoid (or softmax), + correction bias, topk, gather, sum, add, divide and multiply: about
eight small launches per MoE layer, a noticeable share of a CUDA-graph decode step whose layers each do
little work. Here they are one kernel, `route_topk_fwd_kernel`, with one program per token row:

1. Load the row's E logits into registers, padded to a power of two BE; padded lanes are never chosen.
2. scores = sigmoid(logits), or softmax over the E real lanes; biased = scores + bias.
3. TOP_K rounds of: the largest biased score among the lanes not yet taken, the lowest lane holding it
   (so ties go to the lowest expert id, deterministically), then take that lane. Each round records the
   id and its weight, read from the biased or the unbiased scores (WEIGHTS_FROM_BIASED).
4. Optionally renormalize the k weights to sum to one (+ 1e-20, as the reference), times the scaling.

The ids come out in choice order (largest biased score first), which torch.topk(sorted=False) does not
promise; the set of ids and the weight of each id are the same. The grid is fixed by N alone and nothing
is read back to the host, so a CUDA graph can replay it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_desk.kernels import pdl_launch
from kimi_desk.kernels.grid_dependency import wait_for_previous_kernel


@triton.jit
def route_topk_fwd_kernel(
    logits,
    bias,
    ids,
    weights,
    scaling,
    stride_n,
    E: tl.constexpr,
    BE: tl.constexpr,
    TOP_K: tl.constexpr,
    BK: tl.constexpr,
    SIGMOID: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    WEIGHTS_FROM_BIASED: tl.constexpr,
    APPEND: tl.constexpr,
    K_OUT: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        wait_for_previous_kernel()
    i_n = tl.program_id(0).to(tl.int64)
    o_e = tl.arange(0, BE)
    m_e = o_e < E
    b_logits = tl.load(logits + i_n * stride_n + o_e, mask=m_e, other=float("-inf")).to(tl.float32)
    if SIGMOID:
        b_scores = tl.sigmoid(b_logits)
    else:
        # Padded lanes hold -inf, so exp gives them 0 and they drop out of the sum.
        b_exp = tl.exp(b_logits - tl.max(b_logits, 0))
        b_scores = b_exp / tl.sum(b_exp, 0)
    b_biased = b_scores + tl.load(bias + o_e, mask=m_e, other=0.0).to(tl.float32)
    if WEIGHTS_FROM_BIASED:
        b_source = b_biased
    else:
        b_source = b_scores
    # NaN ranks above every number, as in torch.topk: a poisoned row still yields ids in range (and NaN
    # weights), where a NaN that never equals the max would yield no id at all.
    b_rank = tl.where(b_biased != b_biased, float("inf"), b_biased)

    o_k = tl.arange(0, BK)
    b_ids = tl.zeros([BK], dtype=tl.int64)
    b_weights = tl.zeros([BK], dtype=tl.float32)
    # Taken lanes are tracked apart from the scores (not overwritten with -inf), so a score of -inf can
    # still be chosen once and padded lanes never are.
    b_free = m_e
    for j in tl.static_range(TOP_K):
        b_best = tl.max(tl.where(b_free, b_rank, float("-inf")), 0)
        i_best = tl.min(tl.where(b_free & (b_rank == b_best), o_e, BE), 0)
        b_hit = o_e == i_best
        b_ids = tl.where(o_k == j, i_best.to(tl.int64), b_ids)
        b_weights = tl.where(o_k == j, tl.sum(tl.where(b_hit, b_source, 0.0), 0), b_weights)
        b_free = b_free & ~b_hit

    if RENORMALIZE:
        # Lanes past TOP_K hold 0 and add nothing.
        b_weights = b_weights / (tl.sum(b_weights, 0) + 1e-20)
    b_weights = b_weights * scaling
    if APPEND >= 0:
        # The shared expert, stacked after the routed ones: chosen by every token, weight 1.
        b_ids = tl.where(o_k == TOP_K, APPEND, b_ids)
        b_weights = tl.where(o_k == TOP_K, 1.0, b_weights)
    m_k = o_k < K_OUT
    tl.store(ids + i_n * K_OUT + o_k, b_ids, mask=m_k)
    tl.store(weights + i_n * K_OUT + o_k, b_weights, mask=m_k)


def route_topk_triton(logits, bias, top_k, activation, renormalize, scaling, weights_from_biased, append=None):
    """naive.route_topk_torch in one launch: logits [N, E] float32 and the correction bias [E] -> (ids
    [N, k] int64, weights [N, k] float32), k = top_k, or top_k + 1 with `append` (that id, weight 1)."""
    N, E = logits.shape
    assert bias.shape == (E,) and 1 <= top_k <= E
    assert activation in ("sigmoid", "softmax")
    logits = logits.float()
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    bias = bias.float().contiguous()
    k_out = top_k + (append is not None)
    ids = torch.empty(N, k_out, dtype=torch.int64, device=logits.device)
    weights = torch.empty(N, k_out, dtype=torch.float32, device=logits.device)
    if N == 0:
        return ids, weights
    BE = triton.next_power_of_2(E)
    # One warp for E <= 256 keeps every reduction within the warp (shuffles, no shared memory or barrier);
    # wider rows get more warps so a thread holds at most ~16 lanes of each register array.
    num_warps = min(8, max(1, BE // 256))
    route_topk_fwd_kernel[(N,)](
        logits,
        bias,
        ids,
        weights,
        float(scaling),
        logits.stride(0),
        E=E,
        BE=BE,
        TOP_K=top_k,
        BK=triton.next_power_of_2(k_out),
        SIGMOID=activation == "sigmoid",
        RENORMALIZE=bool(renormalize),
        WEIGHTS_FROM_BIASED=bool(weights_from_biased),
        APPEND=-1 if append is None else int(append),
        K_OUT=k_out,
        num_warps=num_warps,
        **pdl_launch(logits),
    )
    return ids, weights
