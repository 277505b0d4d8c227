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
