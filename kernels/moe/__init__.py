"""The routed experts of a MoE layer: `routed_experts(x, ids, weights, w1, w2, w3, scales=None)`.

x [N, D]; ids [N, k] chosen experts; weights [N, k] float32 mixing weights; w1 (gate), w3 (up) [E, I, D]
and w2 (down) [E, D, I] stacked per expert. Returns float32 [N, D] (naive.py has the formula). scales is
None (weights in x's precision) or (s1 [E, I], s2 [E, D], s3 [E, I]): float32 per-output-row scales of
fp8 weights (kernels/quant has the format), which every path applies to the chosen experts only.

On CUDA, up to GEMV_MAX_TOKENS tokens (decode, speculative decode) go to the grouped GEMV of gemv.py:
two launches, no host synchronisation, each chosen expert's weights read once per token that chose it.
More tokens, and everything on the CPU, take the grouped PyTorch path (one product per chosen expert,
which asks the host which experts were chosen).
"""

from kimi_desk.kernels import use_triton
from kimi_desk.kernels.moe.naive import routed_experts_gathered, routed_experts_grouped

__all__ = ["routed_experts", "routed_experts_gathered", "routed_experts_grouped"]

# Tokens up to which the GEMV kernel runs. Its programs work per (token, chosen expert), so an expert that
# several tokens chose is read once per token (the repeats mostly from L2: they run side by side); past a
# few tokens the grouped products, which read it once for all of them, win.
GEMV_MAX_TOKENS = 16


def routed_experts(x, ids, weights, w1, w2, w3, scales=None):
    if ids.shape[0] <= GEMV_MAX_TOKENS and use_triton(x):
        # Imported here: Triton is only loaded when a CUDA tensor asks for it.
        from kimi_desk.kernels.moe.gemv import routed_experts_gemv

        return routed_experts_gemv(x, ids, weights, w1, w2, w3, scales=scales)
    return routed_experts_grouped(x, ids, weights, w1, w2, w3, scales=scales)
