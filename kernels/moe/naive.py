"""The routed experts of a MoE layer in PyTorch.

Weights are stacked per expert: w1 (gate) and w3 (up) [E, I, D], w2 (down) [E, D, I]. For tokens x
[N, D], chosen experts ids [N, k] and mixing weights [N, k] (fp32), the output is
    out[n] = sum_j weights[n, j] * w2[e] (SiLU(w1[e] x[n]) * (w3[e] x[n])),   e = ids[n, j]
in float32 [N, D] (kimi-linear-spec.md §5.2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def routed_experts_grouped(x, ids, weights, w1, w2, w3):
    """Tokens grouped by expert: each chosen expert runs once on all of its tokens. The CPU path and the
    GPU's prefill path; it asks the host which experts were chosen (a device synchronisation)."""
    N, k = ids.shape
    out = torch.zeros(N, x.shape[-1], dtype=torch.float32, device=x.device)
    flat = ids.reshape(-1)
    order = flat.argsort()
    experts, counts = flat[order].unique_consecutive(return_counts=True)
    token_of = order // k
    start = 0
    for e, n in zip(experts.tolist(), counts.tolist()):
        rows = order[start : start + n]
        tokens = token_of[start : start + n]
        start += n
        xe = x[tokens]
        ye = F.linear(F.silu(F.linear(xe, w1[e])) * F.linear(xe, w3[e]), w2[e])
        out.index_add_(0, tokens, ye.float() * weights.reshape(-1)[rows, None])
    return out


def routed_experts_gathered(x, ids, weights, w1, w2, w3):
    """The chosen experts' weights gathered by the id tensor, then batched products: no host
    synchronisation (a CUDA graph can hold it), but the gather copies every chosen weight before the
    products read it again, about three times the bytes of the Triton kernel. Kept as the benchmark's
    graph-capturable PyTorch comparison."""
    N, k = ids.shape
    flat = ids.reshape(-1)  # [N * k]
    xe = x.repeat_interleave(k, dim=0).unsqueeze(-1)  # [N * k, D, 1]
    gate = torch.bmm(w1[flat], xe)  # [N * k, I, 1]
    up = torch.bmm(w3[flat], xe)
    ye = torch.bmm(w2[flat], F.silu(gate) * up).squeeze(-1)  # [N * k, D]
    return (ye.float() * weights.reshape(-1, 1)).view(N, k, -1).sum(1)
