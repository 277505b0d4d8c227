"""The routed experts of a MoE layer in PyTorch.

Weights are stacked per expert: w1 (gate) and w3 (up) [E, I, D], w2 (down) [E, D, I]. For tokens x
[N, D], chosen experts ids [N, k] and mixing weights [N, k] (fp32), the output is
    out[n] = sum_j weights[n, j] * w2[e] (SiLU(w1[e] x[n]) * (w3[e] x[n])),   e = ids[n, j]
in float32 [N, D] (kimi-linear-spec.md §5.2).

Quantized experts (engine/quantize.py; kernels/quant has the formats) pass `scales`: for fp8 or int8
codes, (s1 [E, I], s2 [E, D], s3 [E, I]), the float32 per-output-row scales of w1, w2, w3; for int4
codes (packed [E, O, D / 2]), ((s1, z1), (s2, z2), (s3, z3)), each [E, O, groups] bf16. Each chosen
expert's matrices are then dequantized to x's dtype before its products. scales=None: the weights are
used as they are. On the CPU, int4 experts in PyTorch's operator layout take routed_experts_int4_cpu,
and int8 experts chosen by a few tokens PyTorch's int8 operator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kimi_desk.kernels.dense import bf16_cpu, linear
from kimi_desk.kernels.quant import GEMV_MAX_TOKENS, avx2, dequantize_rows
from kimi_desk.kernels.quant.cpu import (
    cpu_int8_fits,
    int4_expert_cpu,
    int4_experts_stacked,
    int8_linear_cpu,
    tiles_to_codes,
    tiles_to_scales,
)
from kimi_desk.kernels.quant.naive import dequantize_int4_groups


def route_topk_torch(logits, bias, top_k, activation, renormalize, scaling, weights_from_biased=False, append=None):
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
    """w1, w2, w3 at `index` (an expert id, or ids for a gather); quantized ones dequantized to `dtype`."""
    if scales is None:
        return w1[index], w2[index], w3[index]
    if isinstance(scales[0], tuple):  # int4: (scale, zero) per matrix
        return tuple(
            dequantize_int4_groups(w[index], s[index], z[index], dtype) for w, (s, z) in zip((w1, w2, w3), scales)
        )
    return tuple(dequantize_rows(w[index], s[index], dtype) for w, s in zip((w1, w2, w3), scales))


def kernel_operands(x, ids, weights, w1, w2, w3, scales):
    """routed_experts' arguments checked against the layout above, for the Triton kernels (gemv.py,
    grouped.py). Returns (N, k, D, E, I), whether the experts are int4, (s1, s2, s3) and (z1, z2, z3):
    float32 row scales (fp8, int8) or bf16 group scales and midpoints (int4), contiguous; None where the
    weights have none."""
    N, D = x.shape
    k = ids.shape[1]
    int4 = scales is not None and isinstance(scales[0], tuple)
    E, I = w1.shape[:2]
    packing = 2 if int4 else 1
    assert w1.shape == w3.shape == (E, I, D // packing) and w2.shape == (E, D, I // packing)
    assert weights.shape == ids.shape and w1.is_contiguous() and w2.is_contiguous() and w3.is_contiguous()
    zeros = (None, None, None)
    if scales is None:
        scales = (None, None, None)
    elif int4:
        scales, zeros = zip(*((s.contiguous(), z.contiguous()) for s, z in scales))
        assert scales[0].shape[:2] == (E, I) and scales[1].shape[:2] == (E, D)
    else:
        scales = tuple(s.float().contiguous() for s in scales)
        assert scales[0].shape == scales[2].shape == (E, I) and scales[1].shape == (E, D)
    return (N, k, D, E, I), int4, scales, zeros


def routed_experts_grouped(x, ids, weights, w1, w2, w3, scales=None, out_dtype=None):
    """Tokens grouped by expert: each chosen expert runs once on all of its tokens. The CPU path (the
    GPU's prefill takes grouped.py's Triton GEMM instead); it asks the host which experts were chosen (a
    device synchronisation). An int8 expert that a few tokens chose multiplies its codes as they are
    (kernels/quant/cpu.py), without a dequantized copy; one token's int8 experts go in one call of our
    AVX2 kernel where it runs (kernels/quant/avx2.py), and so do one token's bfloat16 experts
    (kernels/dense/bf16_cpu.py). [N, D] float32, or out_dtype."""
    if scales is None and bf16_cpu.experts_take(x, ids, w1, w2, w3):  # one token, unquantized experts: one call
        return _in_dtype(bf16_cpu.experts_one_token(x, ids[0], weights[0], w1, w2, w3, _written(out_dtype)), out_dtype)
    int8 = scales is not None and not isinstance(scales[0], tuple) and cpu_int8_fits(x, w1)
    if int8 and x.shape[0] == 1:  # one token: its experts in one call of our AVX2 kernel where it runs
        s1, s2, s3 = scales
        out = avx2.int8_experts_one_token(x, ids[0], weights[0], w1, w2, w3, s1, s2, s3, _written(out_dtype))
        if out is not None:
            return _in_dtype(out, out_dtype)

    def expert(e, xe):
        if int8 and xe.shape[0] <= GEMV_MAX_TOKENS:
            s1, s2, s3 = (s[e] for s in scales)
            h = F.silu(int8_linear_cpu(xe, w1[e], s1)) * int8_linear_cpu(xe, w3[e], s3)
            return int8_linear_cpu(h, w2[e], s2)
        # One expert's matrices at a time: quantized ones are dequantized a few MB at a time, never all E.
        w1e, w2e, w3e = chosen_weights(e, w1, w2, w3, scales, x.dtype)
        return linear(F.silu(linear(xe, w1e)) * linear(xe, w3e), w2e)

    return _in_dtype(_by_expert(x, ids, weights, expert), out_dtype)


def routed_experts_int4_cpu(x, ids, weights, expert_weights, stacks=None, out_dtype=None):
    """routed_experts_grouped for int4 experts on the CPU: `expert_weights[e]` is expert e's
    CpuInt4Expert (kernels/quant/cpu.py: PyTorch's int4 operator layout, w1 and w3 joined), so each
    chosen expert's products read its packed weights directly and the others are never touched. With the
    experts' `stacks`, the tokens take all their experts in one call of our AVX2 kernels where they run
    (kernels/quant/cpu.py int4_experts_stacked). Returns [N, D] float32, or out_dtype."""
    if stacks is not None:
        out = int4_experts_stacked(x, ids, weights, stacks, _written(out_dtype))
        if out is not None:
            return _in_dtype(out, out_dtype)
    return _in_dtype(_by_expert(x, ids, weights, lambda e, xe: int4_expert_cpu(xe, expert_weights[e])), out_dtype)


def _written(out_dtype):
    """The dtype our CPU experts kernels write for a result wanted in out_dtype (None: float32): itself
    where they write it (float32, bfloat16), else float32."""
    return out_dtype if out_dtype in (torch.float32, torch.bfloat16) else torch.float32


def _in_dtype(out, out_dtype):
    return out if out_dtype is None else out.to(out_dtype)


def _by_expert(x, ids, weights, expert):
    """sum_j weights[n, j] * expert(ids[n, j], x[n]) in float32 [N, D], calling `expert(e, rows of x)`
    once per chosen expert with all the tokens that chose it."""
    N, k = ids.shape
    if N == 1:
        # One token (decode): its k experts one after another, nothing sorted or scattered; the sort,
        # the grouping and the scatter cost more than a small expert's products.
        out = None
        for j, e in enumerate(ids[0].tolist()):
            y = expert(e, x).float() * weights[:, j : j + 1]
            out = y if out is None else out.add_(y)
        return out
    out = torch.zeros(N, x.shape[-1], dtype=torch.float32, device=x.device)
    flat = ids.reshape(-1)
    order = flat.argsort()
    experts, counts = flat[order].unique_consecutive(return_counts=True)
    token_of = order // k
    start = 0
    for e, n in zip(experts.tolist(), counts.tolist()):
        rows, tokens = order[start : start + n], token_of[start : start + n]
        start += n
        out.index_add_(0, tokens, expert(e, x[tokens]).float() * weights.reshape(-1)[rows, None])
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


def streamed_experts_torch(x, gate_up, down, rows, weights, bank=None, counts=None, layout=None):
    """Routed experts from stacks holding the CPU operator's int4 tiles (streamed.py has the layout and
    the arguments; `layout` defaults to this machine's) -> each token's weighted sum of its pairs'
    experts, [N, D] float32. Each distinct expert dequantized to float32 once (one at a time: a reference
    that a GPU may run with 32 tokens' pairs), then its pairs' products."""
    x = x.reshape(-1, x.shape[-1]).float()
    N, K = x.shape[0], rows.shape[-1]
    rows, weights = rows.reshape(N * K), weights.reshape(N * K).float()
    slot = torch.full_like(rows, -1)
    if bank is not None:
        match = (rows[:, None] == bank[2][None, :]) & (rows[:, None] >= 0)
        slot = torch.where(match.any(1), match.int().argmax(1), -1)  # the first slot holding the row
    if counts is not None:
        counts[0] += ((rows >= 0) & (slot < 0)).sum()
        counts[2] += (slot >= 0).sum()

    def dense(pair, index):
        tiles, scales = (t[index : index + 1].to(x.device) for t in pair)
        codes = tiles_to_codes(tiles, tiles.shape[-2], layout)
        return dequantize_int4_groups(codes, *tiles_to_scales(scales), torch.float32)[0]  # [O, D]

    out = torch.zeros(N * K, x.shape[-1], dtype=torch.float32, device=x.device)
    # A pair of row -1 is left out; pairs reading the same expert from the same place share its weights.
    sources = {(int(r), int(s)) for r, s in zip(rows.tolist(), slot.tolist()) if r >= 0}
    for row, s in sources:
        pairs = ((rows == row) & (slot == s)).nonzero().flatten()
        if s >= 0:
            w13, w2 = dense(bank[0], s), dense(bank[1], s)
        else:
            w13, w2 = dense(gate_up, row), dense(down, row)
        gate, up = (x[pairs // K] @ w13.T).chunk(2, dim=-1)
        out[pairs] = (F.silu(gate) * up) @ w2.T * weights[pairs, None]
    return out.view(N, K, -1).sum(1)


def gather_rows_torch(src, rows, dst) -> None:
    """dst[s] = src[rows[s]] where rows[s] >= 0, the others left as they are."""
    for s, row in enumerate(rows.tolist()):
        if row >= 0:
            dst[s].copy_(src[row])
