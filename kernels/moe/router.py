"""A MoE router for a few tokens (decode), logits and choice in one Triton launch.

naive.route_topk_torch (after the logits product x @ W^T in float32) is the reference and the path for
everything else (kernels/moe's `route` dispatches). That path takes a cast of x, a matrix-vector product
and about eight small launches after it (sigmoid, + bias, topk, gather, sum, add, divide, multiply) per
MoE layer: a noticeable share of a CUDA-graph decode step whose layers each do little work. Here they are
one kernel, `route_fwd_kernel`, with a grid of (token, block of BLOCK_E experts):

1. Each program computes its block's logits in float32, x [D] against its rows of the router weight
   [BLOCK_E, D] (read once: 16 programs read a 256-expert router's 2.4 MB side by side), and stores them.
2. It counts itself done on the token's counter; the last of the token's programs to finish (the others'
   logits visible to it: release / acquire) makes the choice, as `_choose` below:
   a. The row's E logits in registers, padded to a power of two BE; padded lanes are never chosen.
   b. scores = sigmoid(logits), or softmax over the E real lanes; biased = scores + bias.
   c. TOP_K rounds of: the largest biased score among the lanes not yet taken, the lowest lane holding it
      (so ties go to the lowest expert id, deterministically), then take that lane. Each round records
      the id and its weight, read from the biased or the unbiased scores (WEIGHTS_FROM_BIASED).
   d. Optionally renormalize the k weights to sum to one (+ 1e-20, as the reference), times the scaling;
      with APPEND (the shared expert stacked after the routed ones) one more column, that id, weight 1.
   It puts the counter back to zero (the counters are kimi_desk.kernels.zeroed_counters).

The ids come out in choice order (largest biased score first), which torch.topk(sorted=False) does not
promise; the set of ids and the weight of each id are the same. The grid is fixed by N and E alone and
nothing is read back to the host, so a CUDA graph can replay it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_desk.kernels import zeroed_counters

@triton.jit
def route_fwd_kernel(
    x,
    router,
    bias,
    logits,
    counter,
    ids,
    weights,
    scaling,
    stride_x,
    D: tl.constexpr,
    E: tl.constexpr,
    BE: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BD: tl.constexpr,
    TOP_K: tl.constexpr,
    BK: tl.constexpr,
    SIGMOID: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    WEIGHTS_FROM_BIASED: tl.constexpr,
    APPEND: tl.constexpr,
    K_OUT: tl.constexpr,
):
    i_n, i_b = tl.program_id(0).to(tl.int64), tl.program_id(1)
    o_eb = i_b * BLOCK_E + tl.arange(0, BLOCK_E)
    m_eb = o_eb < E
    b_acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_d = o_d < D
        b_x = tl.load(x + i_n * stride_x + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_w = tl.load(router + o_eb[:, None] * D + o_d[None, :], mask=m_eb[:, None] & m_d[None, :], other=0.0)
        b_acc += tl.sum(b_w.to(tl.float32) * b_x[None, :], 1)
    tl.store(logits + i_n * E + o_eb, b_acc, mask=m_eb)
    # Every thread's stores are done (barrier) before the count is released; the last program acquires it
    # before reading the others' logits (from L2).
    tl.debug_barrier()
    if tl.atomic_add(counter + i_n, 1, sem="acq_rel", scope="gpu") == tl.num_programs(1) - 1:
        tl.debug_barrier()
        _choose(logits, bias, ids, weights, scaling, i_n, E, BE, TOP_K, BK, SIGMOID, RENORMALIZE,
                WEIGHTS_FROM_BIASED, APPEND, K_OUT)
        tl.atomic_xchg(counter + i_n, 0, sem="relaxed", scope="gpu")


@triton.jit
def _choose(
    logits,
    bias,
    ids,
    weights,
    scaling,
    i_n,
    E: tl.constexpr,
    BE: tl.constexpr,
    TOP_K: tl.constexpr,
    BK: tl.constexpr,
    SIGMOID: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    WEIGHTS_FROM_BIASED: tl.constexpr,
    APPEND: tl.constexpr,
    K_OUT: tl.constexpr,
):
    o_e = tl.arange(0, BE)
    m_e = o_e < E
    b_logits = tl.load(logits + i_n * E + o_e, mask=m_e, other=float("-inf"), cache_modifier=".cg")
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


# Experts per program, and the width of a step along D: a [16, 256] float32 tile of the router is 16 KB,
# 32 registers a thread at 4 warps; 16 programs per token for E = 256.
BLOCK_E = 16
BLOCK_D = 256


def route_triton(x, router, bias, top_k, activation, renormalize, scaling, weights_from_biased, append=None):
    """naive.route_topk_torch on the logits x @ router^T, in one launch: x [N, D] (any float dtype, a
    contiguous last axis), router [E, D] and the correction bias [E] (float32) -> (ids [N, k] int64,
    weights [N, k] float32), k = top_k, or top_k + 1 with `append` (that id, weight 1)."""
    N, D = x.shape
    E = router.shape[0]
    assert router.shape == (E, D) and bias.shape == (E,) and 1 <= top_k <= E
    assert activation in ("sigmoid", "softmax")
    if x.stride(-1) != 1:
        x = x.contiguous()
    router, bias = router.float().contiguous(), bias.float().contiguous()
    k_out = top_k + (append is not None)
    ids = torch.empty(N, k_out, dtype=torch.int64, device=x.device)
    weights = torch.empty(N, k_out, dtype=torch.float32, device=x.device)
    if N == 0:
        return ids, weights
    logits = torch.empty(N, E, dtype=torch.float32, device=x.device)
    route_fwd_kernel[(N, triton.cdiv(E, BLOCK_E))](
        x, router, bias, logits, zeroed_counters(x.device, N), ids, weights, float(scaling), x.stride(0),
        D=D, E=E, BE=triton.next_power_of_2(E), BLOCK_E=BLOCK_E, BD=min(BLOCK_D, triton.next_power_of_2(D)),
        TOP_K=top_k, BK=triton.next_power_of_2(k_out), SIGMOID=activation == "sigmoid",
        RENORMALIZE=bool(renormalize), WEIGHTS_FROM_BIASED=bool(weights_from_biased),
        APPEND=-1 if append is None else int(append), K_OUT=k_out, num_warps=4,
    )
    return ids, weights
