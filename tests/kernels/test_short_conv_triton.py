"""The fused short-convolution update (q, k, v in one launch, windows in place), run on CPU tensors
through Triton's interpreter, against a PyTorch depthwise convolution."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")
from kimi_desk.kernels.kda.short_conv import short_conv_update_triton  # noqa: E402


def reference(x, weight, window):
    """x [B, T, P], weight [P, 1, W], window [B, P, W - 1] -> (SiLU(causal conv) [B, T, P], new window)."""
    W = weight.shape[-1]
    full = torch.cat([window.double(), x.double().transpose(1, 2)], dim=-1)  # [B, P, W - 1 + T]
    y = F.conv1d(full, weight.double(), groups=x.shape[-1])  # [B, P, T]
    return F.silu(y).transpose(1, 2), full[..., full.shape[-1] - (W - 1) :]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,T,P", [(1, 1, 40), (2, 2, 64), (1, 5, 33)], ids=lambda x: str(x))
def test_matches_conv1d_and_advances_the_window_in_place(dtype, B, T, P):
    """Channel counts past one block (block_p 16: several programs, the last one masked); T below and
    above the window width."""
    gen = torch.Generator().manual_seed(T * 5 + P)
    xs = [torch.randn(B, T, P, generator=gen).to(dtype) for _ in range(3)]
    weights = [(torch.rand(P, 1, 4, generator=gen) - 0.5).to(dtype) for _ in range(3)]
    window = torch.randn(B, 3, P, 3, generator=gen).to(dtype)
    before, storage = window.clone(), window.data_ptr()
    ys = short_conv_update_triton(xs, weights, window, block_p=16)
    assert window.data_ptr() == storage
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for s in range(3):
        y_ref, window_ref = reference(xs[s], weights[s], before[:, s])
        assert ys[s].dtype == dtype
        assert ((ys[s].double() - y_ref).norm() / y_ref.norm()).item() < tol
        # The window holds inputs, moved, not computed: exact.
        assert torch.equal(window[:, s].double(), window_ref)


def test_the_window_written_elsewhere_leaves_the_old_one():
    """window_out: the new window there, the old one untouched (a decode step that can be taken back)."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    B, T, P = 1, 1, 40
    xs = [torch.randn(B, T, P, generator=gen) for _ in range(3)]
    weights = [torch.rand(P, 1, 4, generator=gen) - 0.5 for _ in range(3)]
    window = torch.randn(B, 3, P, 3, generator=gen)
    before, written = window.clone(), torch.full_like(window, float("nan"))
    ys = short_conv_update_triton(xs, weights, window, block_p=16, window_out=written)
    assert torch.equal(window, before)
    for s in range(3):
        y_ref, window_ref = reference(xs[s], weights[s], before[:, s])
        assert ((ys[s].double() - y_ref).norm() / y_ref.norm()).item() < 1e-6
        assert torch.equal(written[:, s].double(), window_ref)
