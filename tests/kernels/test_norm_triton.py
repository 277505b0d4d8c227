"""The RMS norm kernels, run on CPU tensors through Triton's interpreter, against naive.py's PyTorch
forms (which the CPU path runs)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
from kimi_desk.kernels.norm.fused import rms_norm_triton  # noqa: E402
from kimi_desk.kernels.norm.naive import gated_rms_norm_torch, rms_norm_torch  # noqa: E402

# fp32: summation order only. bf16: the same roundings as the PyTorch form, but Triton's interpreter
# (3.9) converts fp32 to bf16 by another rounding than PyTorch's, so elements may sit an ulp apart.
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 8e-3}


def rel_err(a, b):
    assert not torch.isnan(a).any(), "NaN in the output (an element the kernel never wrote?)"
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N", [40, 128, 2304])
def test_rms_norm(dtype, N):
    gen = torch.Generator().manual_seed(N)
    x = (3 * torch.randn(2, 3, N, generator=gen)).to(dtype)
    weight = (1 + 0.1 * torch.randn(N, generator=gen)).to(dtype)
    got = rms_norm_triton(x, weight, 1e-5)
    want = rms_norm_torch(x, weight, 1e-5)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert rel_err(got, want) < TOLERANCE[dtype]


def test_rms_norm_of_strided_rows_and_mixed_dtypes():
    """A slice of a wider tensor (the MLA latent before its rope part), fp32 weight on bf16 input."""
    gen = torch.Generator().manual_seed(1)
    wide = torch.randn(2, 5, 40, generator=gen).bfloat16()
    x = wide[..., :32]
    weight = 1 + 0.1 * torch.randn(32, generator=gen)
    got = rms_norm_triton(x, weight, 1e-6)
    want = rms_norm_torch(x, weight, 1e-6)
    assert got.dtype == want.dtype == torch.float32
    assert rel_err(got, want) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gated_rms_norm(dtype):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 3, 4, 48, generator=gen).to(dtype)
    gate = (4 * torch.randn(1, 3, 4, 48, generator=gen)).to(dtype)
    weight = (1 + 0.1 * torch.randn(48, generator=gen)).to(dtype)
    got = rms_norm_triton(x, weight, 1e-5, gate=gate)
    want = gated_rms_norm_torch(x, gate, weight, 1e-5)
    assert got.dtype == dtype
    assert rel_err(got, want) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_residual_add_then_norm(dtype):
    """With delta: the residual sum, rounded to its dtype as `x + delta` is, and the norm of that sum."""
    gen = torch.Generator().manual_seed(3)
    x = (3 * torch.randn(2, 3, 200, generator=gen)).to(dtype)
    delta = torch.randn(2, 3, 200, generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(200, generator=gen)).to(dtype)
    summed, got = rms_norm_triton(x, weight, 1e-6, delta=delta)
    assert summed.dtype == dtype and got.dtype == dtype
    assert rel_err(summed, x + delta) < TOLERANCE[dtype]  # the interpreter rounds to bf16 its own way
    assert rel_err(got, rms_norm_torch(x + delta, weight, 1e-6)) < TOLERANCE[dtype]


def test_add_rms_norm_dispatch(monkeypatch):
    from kimi_desk.kernels.norm import add_rms_norm

    gen = torch.Generator().manual_seed(4)
    x, delta = torch.randn(3, 64, generator=gen), torch.randn(3, 64, generator=gen)
    weight = torch.rand(64, generator=gen) + 0.5
    want_sum, want = x + delta, rms_norm_torch(x + delta, weight, 1e-6)
    for kernels in ("torch", "triton"):
        monkeypatch.setenv("KIMI_DESK_KERNELS", kernels)
        summed, got = add_rms_norm(x, delta, weight, 1e-6)
        assert rel_err(summed, want_sum) < 1e-7 and rel_err(got, want) < TOLERANCE[torch.float32]
