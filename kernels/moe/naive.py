"""The routed experts of a MoE layer in PyTorch.

Weights are stacked per expert: w1 (gate) and w3 (up) [E, I, D], w2 (down) [E, D, I]. For tokens x
[N, D], chosen experts ids [N, k] and mixing weights [N, k] (fp32), the output is
    out[n] = sum_j weights[n, j] * w2[e] (SiLU(w1[e] x[n]) * (w3[e] x[n])),   e = ids[n, j]
in float32 [N, D] (kimi-linear-spec.md §5.2).

fp8 experts (engine/quantize.py) pass scales = (s1 [E, I], s2 [E, D], s3 [E, I]), the float32 per-output-row
scales of float8_e4m3fn w1, w2, w3 (kernels/quant has the format); each chosen expert's matrices are then
dequantized to x's dtype before its products. scales=None: the weights are used as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kimi_desk.kernels.quant.naive import dequantize_fp8_rows


def route_topk_torch(logits, bias, top_k, activation, renormalize, scaling, weights_from_biased=False,
                     append=None):
    """A router's choice from its logits [N, E] float32: scores = sigmoid (or softmax) of the logits; the
    correction bias [E] only chooses (top_k of scores + bias), the mixing weights are the unbiased scores
    of the chosen experts (the biased ones with weights_from_biased), renormalized to sum to one if asked,
    times `scaling`. Returns (ids [N, top_k] int64, weights [N, top_k] float32); with `append` (an expert
    index: the shared expert stacked after the routed ones) one more column, that id with weight 1."""
    scores = logits.sigmoid() if activation == "sigmoid" else logits.softmax(-1)
    biased = scores + bias.float()
    ids = biased.topk(top_k, dim=-1, sorted=False).indices
    weights = (biased if weights_from_biased else scores).gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    weights = weights * scaling
    if append is not None:
        ids = torch.cat([ids, torch.full_like(ids[:, :1], append)], dim=1)
        weights = torch.cat([weights, torch.ones_like(weights[:, :1])], dim=1)
    return ids, weights


def chosen_weights(index, w1, w2, w3, scales, dtype):
    """w1, w2, w3 at `index` (an expert id, or ids for a gather); fp8 ones dequantized to `dtype`."""
    if scales is None:
        return w1[index], w2[index], w3[index]
    return tuple(dequantize_fp8_rows(w[index], s[index], dtype) for w, s in zip((w1, w2, w3), scales))


def routed_experts_grouped(x, ids, weights, w1, w2, w3, scales=None):
    """Tokens grouped by expert: each chosen expert runs once on all of its tokens. The CPU path (the
    GPU's prefill takes grouped.py's Triton GEMM instead); it asks the host which experts were chosen (a
    device synchronisation)."""
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
        # One expert's matrices at a time: fp8 ones are dequantized a few MB at a time, never all E.
        w1e, w2e, w3e = chosen_weights(e, w1, w2, w3, scales, x.dtype)
        ye = F.linear(F.silu(F.linear(xe, w1e)) * F.linear(xe, w3e), w2e)
        out.index_add_(0, tokens, ye.float() * weights.reshape(-1)[rows, None])
    return out


def routed_experts_gathered(x, ids, weights, w1, w2, w3, scales=None):
    """The chosen experts' weights gathered by the id tensor, then batched products: no host
    synchronisation (a CUDA graph can hold it), but the gather copies every chosen weight before the
    products read it again, about three times the bytes of the Triton kernel. Kept as the benchmark's
    graph-capturable PyTorch comparison."""
    N, k = ids.shape
    flat = ids.reshape(-1)  # [N * k]
    xe = x.repeat_interleave(k, dim=0).unsqueeze(-1)  # [N * k, D, 1]
    w1e, w2e, w3e = chosen_weights(flat, w1, w2, w3, scales, x.dtype)
    gate = torch.bmm(w1e, xe)  # [N * k, I, 1]
    up = torch.bmm(w3e, xe)
    ye = torch.bmm(w2e, F.silu(gate) * up).squeeze(-1)  # [N * k, D]
    return (ye.float() * weights.reshape(-1, 1)).view(N, k, -1).sum(1)
