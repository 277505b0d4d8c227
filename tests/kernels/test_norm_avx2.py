"""kernels/norm/avx2.py against naive.py's PyTorch norms, on fresh random rows in float32 and bfloat16."""

import pytest
import torch

from kimi_desk.kernels.norm import add_rms_norm, avx2, rms_norm
from kimi_desk.kernels.norm.naive import rms_norm_torch


def needs_kernel():
    if avx2.library() is None:
        pytest.skip(avx2.native.reason(avx2.SOURCE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 2304), (3, 5, 136), (7, 13)])
def test_norm_matches_pytorch_form(dtype, shape):
    """The same formula and casts as naive.py: float32 within the sums' order, bfloat16 within one
    rounding (a sum in another order may round the normalised value the other way)."""
    needs_kernel()
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=gen) * torch.rand(shape[-1], generator=gen) * 5).to(dtype)
    weight = (torch.randn(shape[-1], generator=gen) + 1).to(dtype)
    assert avx2.takes(x, weight)
    got, want = avx2.rms_norm_avx2(x, weight, 1e-6), rms_norm_torch(x, weight, 1e-6)
    assert got.dtype == dtype and got.shape == x.shape
    exact = torch.nn.functional.rms_norm(x.double(), (shape[-1],), weight.double(), 1e-6)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=1e-2)
        assert (got != want).float().mean() < 0.02  # the same rounding but where the sums differ
    torch.testing.assert_close(got.double(), exact, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_add_then_norm(dtype):
    """add_rms_norm: (residual + delta rounded to the dtype, its norm), as the PyTorch form gives them."""
    needs_kernel()
    gen = torch.Generator().manual_seed(5)
    residual, delta = (torch.randn(2, 3, 512, generator=gen).to(dtype) for _ in range(2))
    weight = torch.rand(512, generator=gen).to(dtype)
    summed, normed = add_rms_norm(residual, delta, weight, 1e-5)
    assert torch.equal(summed, residual + delta)
    torch.testing.assert_close(
        normed.float(), rms_norm_torch(residual + delta, weight, 1e-5).float(), rtol=1.6e-2, atol=1e-2
    )


def test_other_cases_keep_pytorch():
    """Mixed dtypes, a float16 model, strided rows and gradients go to the PyTorch form."""
    needs_kernel()
    x = torch.randn(4, 64)
    assert not avx2.takes(x, torch.ones(64, dtype=torch.bfloat16))
    assert not avx2.takes(x.half(), torch.ones(64, dtype=torch.half))
    assert not avx2.takes(x.t(), torch.ones(4))
    w = torch.ones(64, requires_grad=True)
    assert not avx2.takes(x, w)
    y = rms_norm(x, w, 1e-6)
    y.sum().backward()
    assert w.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("start_in_memory", [False, True])
def test_latents_into_a_cache(dtype, start_in_memory):
    """MLA's latents [norm(c) ‖ k_r] written into a cache's rows from `start` on (an int, or a tensor the
    kernel reads): naive.py's norm and the rope part as they are, every other row untouched."""
    needs_kernel()
    gen = torch.Generator().manual_seed(11)
    B, T, L, R, capacity, start = 2, 3, 160, 16, 12, 5
    ckv = (torch.randn(B, T, L + R, generator=gen) * 3).to(dtype)
    weight = (torch.randn(L, generator=gen) + 1).to(dtype)
    buffer = torch.full((B, capacity, L + R), 7.0, dtype=dtype)
    assert avx2.takes_latents(ckv, weight, dtype)
    avx2.latents_into(ckv, weight, 1e-6, buffer, torch.tensor([start]) if start_in_memory else start)
    want = torch.cat([rms_norm_torch(ckv[..., :L], weight, 1e-6), ckv[..., L:]], dim=-1)
    written = buffer[:, start : start + T]
    if dtype == torch.float32:
        torch.testing.assert_close(written, want, rtol=2e-6, atol=2e-6)
    else:
        torch.testing.assert_close(written.float(), want.float(), rtol=1.6e-2, atol=1e-2)
    assert torch.equal(written[..., L:], ckv[..., L:])
    untouched = torch.cat([buffer[:, :start], buffer[:, start + T :]], dim=1)
    assert (untouched == 7).all()
    assert not avx2.takes_latents(ckv, weight, torch.float16)
