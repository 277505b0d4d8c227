"""Weight-only fp8 in PyTorch (kernels/quant/naive.py): the format's round trip and the linear form the
CPU path and prefill take."""

import torch

from kimi_desk.kernels.quant import FP8, dequantize_rows, quantize_fp8_rows, row_scaled_linear
from kimi_desk.kernels.quant.naive import FP8_MAX, row_scaled_linear_torch


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_round_trip_of_a_random_matrix():
    """e4m3 keeps 3 mantissa bits: a rounding error of at most 1/16 of a value, about 2% on average."""
    w = torch.randn(96, 200, generator=torch.Generator().manual_seed(0))
    q, s = quantize_fp8_rows(w)
    assert q.dtype == FP8 and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (96,)
    # Every row uses the whole range: its largest element lands on 448.
    assert torch.equal(q.float().abs().amax(-1), torch.full((96,), FP8_MAX))
    assert rel_err(dequantize_rows(q, s, torch.float32), w) < 3e-2


def test_zero_rows_get_scale_one():
    w = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    w[[0, 2]] = 0
    q, s = quantize_fp8_rows(w)
    assert torch.equal(s[[0, 2]], torch.ones(2))
    assert torch.equal(q[[0, 2]].float(), torch.zeros(2, 32))
    assert not torch.isnan(dequantize_rows(q, s, torch.float32)).any()


def test_stacked_experts_have_one_scale_per_expert_row():
    """The routed experts are quantized as [E, O, D]: scales [E, O], each matrix on its own."""
    w = torch.randn(3, 24, 40, generator=torch.Generator().manual_seed(2))
    w[1] *= 1000  # one expert far larger: the others' scales must not follow it
    q, s = quantize_fp8_rows(w)
    assert q.shape == w.shape and s.shape == (3, 24)
    for e in range(3):
        q_e, s_e = quantize_fp8_rows(w[e])
        assert torch.equal(q[e].float(), q_e.float()) and torch.equal(s[e], s_e)
    assert rel_err(dequantize_rows(q, s, torch.float32), w) < 3e-2


def test_dequantize_rounds_once_to_the_dtype():
    q, s = quantize_fp8_rows(torch.randn(8, 16, generator=torch.Generator().manual_seed(3)))
    got = dequantize_rows(q, s, torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, (q.float() * s[:, None]).bfloat16())


def test_row_scaled_linear_torch_is_linear_on_the_dequantized_weight():
    gen = torch.Generator().manual_seed(4)
    q, s = quantize_fp8_rows(torch.randn(48, 64, generator=gen))
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 5, 64, generator=gen).to(dtype)
        got = row_scaled_linear_torch(x, q, s)
        assert got.dtype == dtype and got.shape == (2, 5, 48)
        assert torch.equal(got, torch.nn.functional.linear(x, dequantize_rows(q, s, dtype)))


def test_fp8_linear_on_the_cpu_is_the_torch_form(monkeypatch):
    monkeypatch.delenv("KIMI_DESK_KERNELS", raising=False)
    gen = torch.Generator().manual_seed(5)
    q, s = quantize_fp8_rows(torch.randn(16, 32, generator=gen))
    x = torch.randn(3, 32, generator=gen)
    assert torch.equal(row_scaled_linear(x, q, s), row_scaled_linear_torch(x, q, s))
