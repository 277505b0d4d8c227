"""Inputs and the float64 references shared by the routed-experts kernel tests (GEMV and grouped GEMM) and the
router tests (Triton and C)."""

import torch
import torch.nn.functional as F

from kimi_desk.kernels.quant import (
    dequantize_int4_groups,
    dequantize_rows,
    quantize_fp8_rows,
    quantize_int4_groups,
    quantize_int8_rows,
)


def rel_err(a, b):
    assert not torch.isnan(a).any(), "NaN in the output (an element the kernel never wrote?)"
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_inputs(N, E, k, D, I, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=gen).to(dtype)
    w1 = (torch.randn(E, I, D, generator=gen) / D**0.5).to(dtype)
    w3 = (torch.randn(E, I, D, generator=gen) / D**0.5).to(dtype)
    w2 = (torch.randn(E, D, I, generator=gen) / I**0.5).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(N)])
    weights = torch.rand(N, k, generator=gen) + 0.1
    return x, ids, weights, w1, w2, w3


def reference_f64(x, ids, weights, w1, w2, w3):
    """The formula, one (token, expert) pair at a time, in float64."""
    x, w1, w2, w3 = (t.double() for t in (x, w1, w2, w3))
    out = torch.zeros(x.shape, dtype=torch.float64)
    for n in range(ids.shape[0]):
        for j, e in enumerate(ids[n].tolist()):
            h = F.silu(w1[e] @ x[n]) * (w3[e] @ x[n])
            out[n] += weights[n, j].double() * (w2[e] @ h)
    return out


def spoil_fp8_experts(codes, scales, nan_scales, inf_scales):
    """fp8 experts that must never be read, spoiled in place: NaN codes (0x7F) in all of them, NaN scales
    in experts `nan_scales` and inf scales in `inf_scales`."""
    for q, s in zip(codes, scales):
        q.view(torch.uint8)[[*nan_scales, *inf_scales]] = 0x7F
        s[list(nan_scales)] = float("nan")
        s[list(inf_scales)] = float("inf")


def quantize_experts(w1, w2, w3, fmt="fp8"):
    """Experts as engine/quantize.py stores them in `fmt` (codes, the `scales` argument of the kernels),
    and the float32 weights they stand for."""
    if fmt == "int4":
        parts = [quantize_int4_groups(w) for w in (w1, w2, w3)]
        exact = tuple(dequantize_int4_groups(*part, torch.float32) for part in parts)
        return tuple(p[0] for p in parts), tuple((p[1], p[2]) for p in parts), exact
    quantize = quantize_int8_rows if fmt == "int8" else quantize_fp8_rows
    (q1, s1), (q2, s2), (q3, s3) = (quantize(w) for w in (w1, w2, w3))
    exact = tuple(dequantize_rows(q, s, torch.float32) for q, s in ((q1, s1), (q2, s2), (q3, s3)))
    return (q1, q2, q3), (s1, s2, s3), exact


# Relative error of the float32 weights against float64: a sigmoid (or softmax), an add, a divide and a
# multiply, each within an ulp or two of fp32.
TOLERANCE = 1e-6
SCALING = 2.446


def routing_reference_f64(logits, bias, top_k, activation, renormalize, scaling, weights_from_biased):
    """Router.forward's formula in float64. A stable sort makes ties go to the lowest expert id, as the
    kernel does; random inputs have no ties, so this only matters for the tie test."""
    logits, bias = logits.double(), bias.double()
    scores = logits.sigmoid() if activation == "sigmoid" else logits.softmax(-1)
    biased = scores + bias
    ids = torch.sort(biased, dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = (biased if weights_from_biased else scores).gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return ids, weights * scaling


def sorted_by_id(ids, weights):
    order = ids.argsort(dim=-1)
    return ids.gather(1, order), weights.gather(1, order)


def assert_same_routing(ids, weights, ref_ids, ref_weights, tolerance=TOLERANCE):
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert ids.shape == weights.shape == ref_ids.shape
    assert not torch.isnan(weights).any(), "NaN in the weights (an element the kernel never wrote?)"
    ids, weights = sorted_by_id(ids, weights)
    ref_ids, ref_weights = sorted_by_id(ref_ids, ref_weights)
    assert torch.equal(ids, ref_ids)
    # Per row, relative to the row's norm: biased weights (score + bias) may nearly cancel, and an
    # element near 0 carries the absolute error of its operands.
    diff = (weights.double() - ref_weights.double()).norm(dim=-1)
    err = (diff / ref_weights.double().norm(dim=-1)).max().item()
    assert err < tolerance, f"relative error {err:.3g}"
