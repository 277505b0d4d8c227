"""A MoE layer's routing and routed experts: `route(x, weight, bias, ...)` chooses the experts for tokens x
(`router_logits`, then `route_topk`, which chooses from the logits in one Triton launch for a few tokens
on CUDA, router.py, and PyTorch otherwise; a few tokens on an AVX2 CPU take one C call for both,
router_cpu.py), and `routed_experts(x, ids, weights, w1, w2, w3, scales=None)` runs them.

x [N, D]; ids [N, k] chosen experts; weights [N, k] float32 mixing weights; w1 (gate), w3 (up) [E, I, D]
and w2 (down) [E, D, I] stacked per expert (a shared expert may be stacked after the routed ones, chosen
by every token: engine/fuse.py). Returns [N, D] in float32, or in `out_dtype` (naive.py has the
formula). scales is None (weights in x's precision) or (s1 [E, I], s2 [E, D], s3 [E, I]): float32
per-output-row scales of fp8 weights (kernels/quant has the format), which every path applies to the
chosen experts only.

On CUDA, up to GEMV_MAX_TOKENS tokens (decode, speculative decode) go to the grouped GEMV of gemv.py:
two launches, no host synchronisation, each chosen expert's weights read once per token that chose it,
the sum over a token's experts taken in the second launch.
More tokens (prefill) go to the grouped GEMM of grouped.py: the pairs sorted by expert on the device,
then two launches of tiled products, each expert's weights shared by all of its tokens, again with no
host synchronisation. The CPU, and KIMI_DESK_KERNELS=torch, take the grouped PyTorch path (one product
per chosen expert, which asks the host which experts were chosen).

`streamed_experts(x, gate_up, down, rows, weights)`: decode tokens' experts held in PyTorch's CPU int4
layout, in pinned system RAM or in a bank of GPU slots they were gathered into (`gather_rows`), computed on
the GPU where they are, without a relayout or a host step (streamed.py).
"""

import torch

from kimi_desk.kernels import float32_of, use_triton
from kimi_desk.kernels.moe import router_cpu
from kimi_desk.kernels.moe.naive import (
    gather_rows_torch,
    route_topk_torch,
    routed_experts_gathered,
    routed_experts_grouped,
    routed_experts_int4_cpu,
    streamed_experts_torch,
)
from kimi_desk.kernels.quant import GEMV_MAX_TOKENS as QUANT_GEMV_MAX_TOKENS

__all__ = [
    "gather_rows",
    "route",
    "route_topk",
    "routed_experts",
    "routed_experts_gathered",
    "routed_experts_grouped",
    "routed_experts_int4_cpu",
    "router_logits",
    "streamed_experts",
]

# Tokens up to which the router's choice takes router.py's single launch (decode, speculative decode; on a
# CPU, router_cpu.py's single call): its programs hold one row each and pick the top k in k serial rounds,
# cheap for a few rows, where the eight launches of the PyTorch form cost more than their work. Prefill's
# thousands of rows are better served by PyTorch's batched top-k (which asks the host nothing either).
ROUTER_KERNEL_MAX_TOKENS = 16

# Tokens up to which the GEMV kernel runs. Its programs work per (token, chosen expert), so an expert that
# several tokens chose is read once per token (the repeats mostly from L2: they run side by side); past a
# few tokens the grouped products, which read it once for all of them, win.
GEMV_MAX_TOKENS = 16


def router_logits(x, weight):
    """x [N, D] @ weight [E, D]^T in float32: a router's logits. A few rows on CUDA take the GEMV kernel of
    kernels/quant (exact products, float32 sums, one launch), where PyTorch would launch a cast of x and
    then cuBLAS's float32 GEMV. Elsewhere a bfloat16 weight is widened once (float32_of)."""
    if x.shape[0] <= QUANT_GEMV_MAX_TOKENS and use_triton(x) and weight.is_contiguous():
        from kimi_desk.kernels.quant.gemv import row_scaled_gemv

        return row_scaled_gemv(x, weight, None, out_dtype=torch.float32)
    return x.float() @ float32_of(weight).t()


def route(x, weight, bias, top_k, activation, renormalize, scaling, weights_from_biased=False, append=None):
    """The experts a router of weight [E, D] and correction bias [E] chooses for x [N, D], and their mixing
    weights: route_topk(router_logits(x, weight), bias, ...)."""
    if x.shape[0] <= ROUTER_KERNEL_MAX_TOKENS and not use_triton(x) and router_cpu.takes(x, weight, bias):
        return router_cpu.route_cpu(
            x, weight, bias, top_k, activation, renormalize, scaling, weights_from_biased, append
        )
    logits = router_logits(x, weight)
    return route_topk(logits, bias, top_k, activation, renormalize, scaling, weights_from_biased, append)


def route_topk(logits, bias, top_k, activation, renormalize, scaling, weights_from_biased=False, append=None):
    """The experts a router chooses and their mixing weights, from its logits (naive.route_topk_torch has
    the formula, and `append`). Returns (ids [N, k] int64, weights [N, k] float32), k = top_k (+ 1)."""
    if logits.shape[0] <= ROUTER_KERNEL_MAX_TOKENS and use_triton(logits):
        from kimi_desk.kernels.moe.router import route_topk_triton

        return route_topk_triton(
            logits, bias, top_k, activation, renormalize, scaling, weights_from_biased, append=append
        )
    return route_topk_torch(logits, bias, top_k, activation, renormalize, scaling, weights_from_biased, append)


def routed_experts(x, ids, weights, w1, w2, w3, scales=None, out_dtype=None):
    """Returns [N, D] in float32, or in `out_dtype` (the decode kernel rounds its float32 sum once and
    writes that, saving a launch)."""
    if use_triton(x):
        # Imported here: Triton is only loaded when a CUDA tensor asks for it.
        if ids.shape[0] <= GEMV_MAX_TOKENS:
            from kimi_desk.kernels.moe.gemv import routed_experts_gemv

            return routed_experts_gemv(x, ids, weights, w1, w2, w3, scales=scales, out_dtype=out_dtype or torch.float32)
        from kimi_desk.kernels.moe.grouped import routed_experts_grouped_triton

        out = routed_experts_grouped_triton(x, ids, weights, w1, w2, w3, scales=scales)
    else:
        return routed_experts_grouped(x, ids, weights, w1, w2, w3, scales=scales, out_dtype=out_dtype)
    return out if out_dtype is None else out.to(out_dtype)


def streamed_experts(x, gate_up, down, rows, weights, bank=None, counts=None):
    """Decode tokens' experts in the CPU operator's int4 tiles, stack rows `rows` [N, K] (-1: none), those
    a slot of `bank` holds read from there, computed by the GPU where they are (streamed.py): [N, D]
    float32."""
    if use_triton(x):
        from kimi_desk.kernels.moe.streamed import streamed_experts_triton

        return streamed_experts_triton(x, gate_up, down, rows, weights, bank, counts)
    return streamed_experts_torch(x, gate_up, down, rows, weights, bank, counts)


def gather_rows(src, rows, dst) -> None:
    """dst[s] = src[rows[s]] where rows[s] >= 0; on CUDA one launch, src possibly in pinned host memory."""
    if use_triton(dst):
        from kimi_desk.kernels.moe.streamed import gather_rows_triton

        return gather_rows_triton(src, rows, dst)
    return gather_rows_torch(src, rows, dst)
