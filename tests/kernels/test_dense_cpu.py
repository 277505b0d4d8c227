"""A few rows times a bfloat16 weight in C (kernels/dense/bf16_cpu.c) on fresh random inputs: against float64
on the same bfloat16 values, rounded once where the output is bfloat16; the same bits on any thread count;
the dispatch (kernels.dense.linear) and the model's Linear taking it only where it should."""

import pytest
import torch
import torch.nn.functional as F

from kimi_desk.engine.linear import Linear
from kimi_desk.kernels.dense import bf16_cpu, linear

pytestmark = pytest.mark.skipif(bf16_cpu.library() is None, reason="no C compiler or not an x86-64 CPU")


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("M,O,D", [(1, 320, 320), (1, 1093, 320), (3, 5, 8), (8, 130, 2304), (2, 163, 64)])
def test_rows_match_float64(M, O, D, dtype):
    """The embedded model's shapes, the 48B model's width, heights in no multiple of 4, a single block of
    8 inputs, the most rows a call takes."""
    gen = torch.Generator().manual_seed(M * 1000 + O + D)
    weight = (torch.randn(O, D, generator=gen) * torch.rand(O, 1, generator=gen)).bfloat16()
    x = (torch.randn(M, D, generator=gen) * 3).to(dtype)
    assert bf16_cpu.takes(x, weight)
    got = bf16_cpu.bf16_linear(x, weight)
    want = x.double() @ weight.double().t()
    assert got.shape == (M, O) and got.dtype == dtype
    # float32 sums of D products: a few ulp of float32; bfloat16 output: its own rounding, half an ulp.
    assert rel_err(got, want) < (4e-3 if dtype == torch.bfloat16 else 1e-6)
    if dtype == torch.bfloat16:
        in_float32 = bf16_cpu.bf16_linear(x.float(), weight)
        assert torch.equal(got, in_float32.bfloat16()), "rounded once, from the float32 sums"


def test_same_bits_on_any_thread_count():
    gen = torch.Generator().manual_seed(5)
    weight, x = torch.randn(1000, 512, generator=gen).bfloat16(), torch.randn(2, 512, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = bf16_cpu.bf16_linear(x, weight)
        torch.set_num_threads(max(2, threads))
        assert torch.equal(one, bf16_cpu.bf16_linear(x, weight))
    finally:
        torch.set_num_threads(threads)


def test_what_the_c_call_takes():
    weight, x = torch.randn(16, 64).bfloat16(), torch.randn(2, 64).bfloat16()
    assert bf16_cpu.takes(x, weight) and bf16_cpu.takes(x[None], weight)
    assert not bf16_cpu.takes(torch.randn(bf16_cpu.MAX_ROWS + 1, 64), weight)  # prefill: oneDNN
    assert not bf16_cpu.takes(x, weight.float())
    assert not bf16_cpu.takes(x, weight.t().contiguous().t())  # not contiguous
    assert not bf16_cpu.takes(x[:, :60], torch.randn(16, 60).bfloat16())  # inputs not in 8s
    assert not bf16_cpu.takes(x.half(), weight)
    assert not bf16_cpu.takes(x.requires_grad_(), weight)


def test_linear_dispatch_and_the_model_module():
    """kernels.dense.linear and the model's Linear give F.linear's function on every path: a decode row
    through C, a prefill through PyTorch, and with gradients (training) through PyTorch."""
    gen = torch.Generator().manual_seed(9)
    layer = Linear(256, 96, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(96, 256, generator=gen))
    for rows in (1, bf16_cpu.MAX_ROWS + 4):
        x = torch.randn(1, rows, 256, generator=gen).bfloat16()
        with torch.no_grad():
            got, want = layer(x), F.linear(x, layer.weight)
        assert got.shape == want.shape == (1, rows, 96) and got.dtype == torch.bfloat16
        assert rel_err(got, want) < 4e-3
        assert torch.equal(linear(x, layer.weight), got)
    x = torch.randn(1, 256, generator=gen).bfloat16()
    out = layer(x)
    assert out.requires_grad and out.grad_fn is not None  # autograd kept: the PyTorch product
    assert layer.bias is None


def random_experts(E, I, D, seed):
    gen = torch.Generator().manual_seed(seed)
    w1, w3 = ((torch.randn(E, I, D, generator=gen) * 0.1).bfloat16() for _ in range(2))
    w2 = (torch.randn(E, D, I, generator=gen) * 0.1).bfloat16()
    return gen, w1, w2, w3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("I,D", [(160, 320), (1024, 2304), (8, 16)], ids=["demo", "48B", "tiny"])
def test_experts_of_one_token_match_float64(I, D, dtype):
    """One token through its chosen bfloat16 (or float32) experts: a choice of -1 left out, an expert
    chosen twice counted twice; against float64 on the same weights; bfloat16 out as the float32 result
    rounded once."""
    gen, *experts = random_experts(6, I, D, seed=I + D)
    w1, w2, w3 = (w.to(dtype) for w in experts)
    x = torch.randn(1, D, generator=gen).bfloat16()
    ids, weights = torch.tensor([4, -1, 0, 2, 4]), torch.rand(5, generator=gen)
    assert bf16_cpu.experts_take(x, ids, w1, w2, w3)
    want = torch.zeros(1, D, dtype=torch.float64)
    for e, w in zip(ids.tolist(), weights.tolist()):
        if e >= 0:
            xd = x.double()
            h = F.silu(xd @ w1[e].double().t()) * (xd @ w3[e].double().t())
            want += w * h @ w2[e].double().t()
    got = bf16_cpu.experts_one_token(x, ids, weights, w1, w2, w3)
    assert got.shape == (1, D) and got.dtype == torch.float32 and rel_err(got, want) < 1e-5
    rounded = bf16_cpu.experts_one_token(x, ids, weights, w1, w2, w3, torch.bfloat16)
    assert torch.equal(rounded, got.bfloat16())
    none = bf16_cpu.experts_one_token(x, torch.tensor([-1, -1]), torch.ones(2), w1, w2, w3)
    assert torch.equal(none, torch.zeros(1, D))


def test_routed_experts_take_the_call_for_one_token():
    """kernels.moe's CPU path: one token's bfloat16 experts in the C call, two tokens through PyTorch's
    products expert by expert; both the formula's values."""
    from kimi_desk.kernels.moe import routed_experts

    gen, w1, w2, w3 = random_experts(4, 64, 128, seed=3)
    x = torch.randn(2, 128, generator=gen).bfloat16()
    ids, weights = torch.tensor([[1, 3], [3, 0]]), torch.rand(2, 2, generator=gen)
    assert bf16_cpu.experts_take(x[:1], ids[:1], w1, w2, w3) and not bf16_cpu.experts_take(x, ids, w1, w2, w3)
    one = routed_experts(x[:1], ids[:1], weights[:1], w1, w2, w3, out_dtype=torch.bfloat16)
    both = routed_experts(x, ids, weights, w1, w2, w3, out_dtype=torch.bfloat16)
    assert one.dtype == both.dtype == torch.bfloat16
    assert rel_err(one, both[:1]) < 2e-2  # PyTorch rounds each product and the hidden layer to bf16
    assert not bf16_cpu.experts_take(x[:1], ids[:1], w1.float(), w2, w3.float())
