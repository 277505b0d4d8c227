"""The routed-experts GEMV kernel, run on CPU tensors through Triton's interpreter, against the grouped
PyTorch path the model takes elsewhere and a float64 reference; with weights in x's dtype and in fp8
with per-row scales (kernels/quant).

The entry point is called directly: the dispatcher sends CPU tensors to PyTorch. TRITON_INTERPRET is set
by tests/conftest.py before anything imports Triton; it is set here too for a lone run of this file.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
from moe_cases import make_inputs, quantize_experts, reference_f64, rel_err, spoil_fp8_experts  # noqa: E402

from kimi_desk.kernels.moe import routed_experts_gathered, routed_experts_grouped  # noqa: E402
from kimi_desk.kernels.moe.gemv import routed_experts_gemv  # noqa: E402

# Relative error against float64 on the same rounded weights and inputs. fp32: the kernel accumulates in
# fp32. bf16: the grouped PyTorch path rounds gate, up and h to bf16, the kernel does not; both land
# within a few bf16 ulps of float64.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N,E,k,D,I", [(1, 8, 2, 40, 24), (3, 6, 3, 300, 70), (5, 4, 4, 64, 16)], ids=lambda x: str(x))
def test_gemv_matches_grouped_and_float64(dtype, N, E, k, D, I):
    """Widths that are not powers of two (masked tiles), D longer than one tile, every expert chosen by
    several tokens in the last case."""
    inputs = make_inputs(N, E, k, D, I, dtype, seed=N * 11 + D)
    got = routed_experts_gemv(*inputs)
    assert got.dtype == torch.float32 and got.shape == (N, D)
    want = reference_f64(*inputs)
    assert rel_err(got, want) < TOLERANCE[dtype]
    assert rel_err(got, routed_experts_grouped(*inputs)) < TOLERANCE[dtype]


def test_gemv_reads_only_the_chosen_experts():
    """Experts nobody chose may hold anything, NaN included."""
    x, ids, weights, w1, w2, w3 = make_inputs(2, 6, 2, 48, 32, torch.float32, seed=3)
    ids = torch.tensor([[4, 1], [1, 2]])
    for w in (w1, w2, w3):
        w[[0, 3, 5]] = float("nan")
    got = routed_experts_gemv(x, ids, weights, w1, w2, w3)
    assert rel_err(got, reference_f64(x, ids, weights, w1, w2, w3)) < 1e-5


def test_gathered_torch_path_matches_grouped():
    inputs = make_inputs(3, 8, 2, 40, 24, torch.float32, seed=5)
    assert rel_err(routed_experts_gathered(*inputs), routed_experts_grouped(*inputs)) < 1e-6


# Against float64 on the dequantized weights. The GEMV takes exact products of x and Q and applies the
# scales to fp32 sums, so fp32 sees summation order only. The PyTorch paths round Q * s to x's dtype
# first: in fp32 a few ulps, in bf16 as much as its other roundings of gate, up and h.
FP8_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N,E,k,D,I", [(1, 8, 2, 40, 24), (3, 6, 3, 300, 70), (5, 4, 4, 64, 16)], ids=lambda x: str(x))
def test_fp8_experts_match_float64(dtype, N, E, k, D, I):
    x, ids, weights, w1, w2, w3 = make_inputs(N, E, k, D, I, torch.float32, seed=N * 13 + D)
    # Rows of very different sizes: a scale applied to the wrong row, or not at all, would show.
    w1, w3 = (w * torch.logspace(-1, 1, I)[torch.randperm(I)][:, None] for w in (w1, w3))
    w2 = w2 * torch.logspace(-1, 1, D)[torch.randperm(D)][:, None]
    (q1, q2, q3), scales, exact = quantize_experts(w1, w2, w3)
    x = x.to(dtype)
    want = reference_f64(x, ids, weights, *exact)
    for path in (routed_experts_gemv, routed_experts_grouped, routed_experts_gathered):
        got = path(x, ids, weights, q1, q2, q3, scales=scales)
        assert got.dtype == torch.float32 and got.shape == (N, D)
        assert rel_err(got, want) < FP8_TOLERANCE[dtype], path.__name__


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N,E,k,D,I", [(1, 8, 2, 64, 32), (3, 6, 3, 320, 96), (5, 4, 4, 128, 64)], ids=lambda x: str(x))
def test_int8_and_int4_experts_match_float64(fmt, dtype, N, E, k, D, I):
    """int4 groups of 64 (D = 64, 320) and 32 (I = 32, 96) and 128: the kernels dequantize in registers."""
    x, ids, weights, w1, w2, w3 = make_inputs(N, E, k, D, I, torch.float32, seed=N * 17 + D)
    codes, scales, exact = quantize_experts(w1, w2, w3, fmt)
    x = x.to(dtype)
    want = reference_f64(x, ids, weights, *exact)
    for path in (routed_experts_gemv, routed_experts_grouped):
        got = path(x, ids, weights, *codes, scales=scales)
        assert got.dtype == torch.float32 and got.shape == (N, D)
        # int4 weights dequantized in fp32 registers; the PyTorch path rounds them to x's dtype, and its
        # int8 operator multiplies a few tokens in bf16 (kernels/quant/cpu.py).
        bf16_operator = path is routed_experts_grouped and fmt == "int8"
        tolerance = FP8_TOLERANCE[torch.bfloat16 if bf16_operator else dtype]
        assert rel_err(got, want) < tolerance * (10 if fmt == "int4" and dtype == torch.float32 else 1), path.__name__


@pytest.mark.parametrize("block", [64, 256, 512])
def test_int4_tiles_of_several_groups_match_float64(block):
    """An int4 tile may span several groups (pieces of one group each, more bytes a load): D = 320 in
    groups of 64 and I = 96 in groups of 32, so the last tile holds pieces past the end (masked)."""
    x, ids, weights, w1, w2, w3 = make_inputs(3, 6, 3, 320, 96, torch.float32, seed=block)
    codes, scales, exact = quantize_experts(w1, w2, w3, "int4")
    want = reference_f64(x, ids, weights, *exact)
    configs = (dict(block_d=block, block_i=16), dict(block_i=block, block_d=32))
    got = routed_experts_gemv(x, ids, weights, *codes, scales=scales, configs=configs)
    assert rel_err(got, want) < 1e-4


def test_fp8_gemv_reads_only_the_chosen_experts():
    """Experts nobody chose may hold anything: NaN codes in the weights, NaN and inf in the scales."""
    x, ids, weights, w1, w2, w3 = make_inputs(2, 6, 2, 48, 32, torch.float32, seed=4)
    ids = torch.tensor([[4, 1], [1, 2]])
    (q1, q2, q3), (s1, s2, s3), exact = quantize_experts(w1, w2, w3)
    want = reference_f64(x, ids, weights, *exact)
    spoil_fp8_experts((q1, q2, q3), (s1, s2, s3), nan_scales=(0, 5), inf_scales=(3,))
    got = routed_experts_gemv(x, ids, weights, q1, q2, q3, scales=(s1, s2, s3))
    assert rel_err(got, want) < 1e-5
    assert rel_err(routed_experts_grouped(x, ids, weights, q1, q2, q3, scales=(s1, s2, s3)), want) < 1e-5


def test_gemv_sums_the_pairs_in_the_kernel():
    """The last of a token's pairs sums the partials in pair order: the same bits on every call, and the
    shared counters left at zero."""
    from kimi_desk.kernels import zeroed_counters

    inputs = make_inputs(4, 6, 3, 300, 40, torch.float32, seed=9)
    first = routed_experts_gemv(*inputs)
    for _ in range(2):
        assert torch.equal(routed_experts_gemv(*inputs), first)
    counters = zeroed_counters(inputs[0].device, 1)
    assert not counters.any()
    assert rel_err(first, reference_f64(*inputs)) < 1e-5
