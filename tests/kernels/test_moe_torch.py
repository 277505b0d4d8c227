"""The routed experts' PyTorch paths on the CPU (kernels/moe/naive.py) against the float64 formula: the
grouped products and, for one token (decode), the chosen experts one after another."""

import pytest
import torch
from moe_cases import make_inputs, reference_f64, rel_err

from kimi_desk.kernels.moe import routed_experts_grouped, routed_experts_int4_cpu
from kimi_desk.kernels.quant import (
    avx2,
    dequantize_int4_groups,
    dequantize_rows,
    quantize_int4_groups,
    quantize_int8_rows,
)
from kimi_desk.kernels.quant.cpu import (
    cpu_int4_fits,
    int4_experts_stacked,
    pack_int4_expert_for_cpu,
    stack_int4_experts_for_cpu,
)

# bf16: the products round gate, up and h to bf16.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N,E,k,D,I", [(1, 8, 2, 40, 24), (1, 5, 5, 64, 16), (7, 6, 3, 300, 70)], ids=lambda x: str(x))
def test_grouped_matches_float64(dtype, N, E, k, D, I):
    inputs = make_inputs(N, E, k, D, I, dtype, seed=N * 7 + D)
    got = routed_experts_grouped(*inputs)
    assert got.dtype == torch.float32 and got.shape == (N, D)
    assert rel_err(got, reference_f64(*inputs)) < TOLERANCE[dtype]


@pytest.mark.parametrize("N", [1, 3])
def test_only_the_chosen_experts_are_read(N):
    """Experts nobody chose may hold anything, NaN included."""
    x, ids, weights, w1, w2, w3 = make_inputs(N, 6, 2, 48, 32, torch.float32, seed=N)
    ids = torch.tensor([[4, 1], [1, 2], [2, 4]])[:N]
    for w in (w1, w2, w3):
        w[[0, 3, 5]] = float("nan")
    assert (
        rel_err(routed_experts_grouped(x, ids, weights, w1, w2, w3), reference_f64(x, ids, weights, w1, w2, w3)) < 1e-5
    )


@pytest.mark.parametrize("N", [1, 4])
def test_int4_on_the_cpu_operator_matches_float64(N):
    D, I, E = 256, 128, 4
    if not cpu_int4_fits(I, D):
        pytest.skip("this PyTorch has no CPU int4 operator for these shapes")
    x, ids, weights, w1, w2, w3 = make_inputs(N, E, 2, D, I, torch.bfloat16, seed=N + 40)
    quantized = [quantize_int4_groups(w) for w in (w1, w2, w3)]
    exact = [dequantize_int4_groups(*q, torch.float32) for q in quantized]
    packed = [pack_int4_expert_for_cpu(*(tuple(t[e] for t in q) for q in quantized)) for e in range(E)]
    got = routed_experts_int4_cpu(x, ids, weights, packed)
    want = reference_f64(x, ids, weights, *exact)
    assert got.shape == (N, D) and rel_err(got, want) < 2e-2
    # Stacked, as the engine holds them: one token takes the one-call kernel where it runs.
    stacks, views = stack_int4_experts_for_cpu(iter(packed), E)
    if N == 1 and avx2.library() is not None:
        assert int4_experts_stacked(x, ids[0][None], weights[0][None], stacks) is not None
    stacked = routed_experts_int4_cpu(x, ids, weights, views, stacks)
    assert stacked.shape == (N, D) and rel_err(stacked, want) < 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N", [1, 20])
def test_int8_experts_match_float64(dtype, N):
    """An expert that a few tokens chose multiplies the int8 codes as they are (in bf16: the CPU operator
    rounds a float32 token to it; our AVX2 kernel rounds one token's activations to int8), one that many
    chose dequantizes: both the formula on the dequantized weights."""
    x, ids, weights, w1, w2, w3 = make_inputs(N, 6, 2, 64, 96, dtype, seed=N + 60)
    codes, scales, exact = [], [], []
    for w in (w1, w2, w3):
        q, s = quantize_int8_rows(w.float())
        codes.append(q)
        scales.append(s)
        exact.append(dequantize_rows(q, s, torch.float64))
    if N == 1 and avx2.library() is not None:  # one token: the one-call kernel (activations in int8)
        s1, s2, s3 = scales
        assert avx2.int8_experts_one_token(x, ids[0], weights[0], *codes, s1, s2, s3) is not None
    got = routed_experts_grouped(x, ids, weights, *codes, scales=tuple(scales))
    assert rel_err(got, reference_f64(x, ids, weights, *exact)) < TOLERANCE[torch.bfloat16]
