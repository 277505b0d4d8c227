"""The PyTorch MLA attention paths against float64 materialising references."""

import pytest
import torch

from kimi_desk.kernels.mla import mla_attention, mla_prefill
from kimi_desk.kernels.mla.naive import mla_attention_reference, mla_attention_torch, mla_prefill_reference, mla_prefill_torch


def rel_err(a, b):
    assert not torch.isnan(a).any()
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("B,Tq,Tk,H", [(1, 1, 1, 2), (2, 1, 3000, 4), (1, 5, 300, 3), (2, 700, 700, 2), (1, 300, 2100, 2)],
                         ids=lambda x: str(x))
def test_absorbed_attention(B, Tq, Tk, H):
    L, R = 32, 8
    q, cache = torch.randn(B, Tq, H, L + R), torch.randn(B, Tk, L + R)
    want = mla_attention_reference(q, cache, Tk - Tq, L, 0.2)
    assert rel_err(mla_attention_torch(q, cache, Tk - Tq, L, 0.2, block_q=64, block_k=256), want) < 1e-5
    assert rel_err(mla_attention(q, cache, Tk - Tq, L, 0.2), want) < 1e-5


@pytest.mark.parametrize("B,Tq,Tk,H", [(1, 1, 1, 2), (1, 64, 64, 4), (2, 300, 1000, 3), (1, 1000, 1000, 2)],
                         ids=lambda x: str(x))
def test_expanded_prefill(B, Tq, Tk, H):
    n, R, L, V = 16, 8, 32, 16
    q, cache = torch.randn(B, Tq, H, n + R), torch.randn(B, Tk, L + R)
    w_uk, w_uv = 0.2 * torch.randn(H, n, L), torch.randn(H, V, L)
    want = mla_prefill_reference(q, cache, w_uk, w_uv, Tk - Tq, 0.2)
    got = mla_prefill_torch(q, cache, w_uk, w_uv, Tk - Tq, 0.2, block_q=128, block_k=96)
    assert rel_err(got, want) < 1e-5
    assert rel_err(mla_prefill(q, cache, w_uk, w_uv, Tk - Tq, 0.2), want) < 1e-5


def test_absorbed_equals_expanded():
    """The two forms are the same attention: W_UK folded into the query, W_UV applied after."""
    H, n, R, L, V, Tk = 3, 16, 8, 32, 16, 200
    q, cache = torch.randn(1, 4, H, n + R), torch.randn(1, Tk, L + R)
    w_uk, w_uv = 0.2 * torch.randn(H, n, L), torch.randn(H, V, L)
    expanded = mla_prefill_reference(q, cache, w_uk, w_uv, Tk - 4, 0.2)
    q_abs = torch.cat([torch.einsum("bthn,hnl->bthl", q[..., :n], w_uk), q[..., n:]], dim=-1)
    latent = mla_attention_reference(q_abs, cache, Tk - 4, L, 0.2)
    absorbed = torch.einsum("bthl,hvl->bthv", latent.double(), w_uv.double())
    assert rel_err(absorbed, expanded) < 1e-5


@pytest.mark.parametrize("Tq,Tk", [(1, 300), (4, 300), (120, 120)])
def test_gpu_forms_on_cpu_tensors(Tq, Tk):
    """The forms the GPU uses are plain PyTorch: check them here in float32."""
    from kimi_desk.kernels.mla.naive import mla_attention_dense, mla_prefill_sdpa

    H, n, R, L, V = 3, 16, 8, 32, 16
    cache = torch.randn(2, Tk, L + R)
    q_abs = torch.randn(2, Tq, H, L + R)
    want = mla_attention_reference(q_abs, cache, Tk - Tq, L, 0.2)
    assert rel_err(mla_attention_dense(q_abs, cache, Tk - Tq, L, 0.2), want) < 1e-5
    q = torch.randn(2, Tq, H, n + R)
    w_uk, w_uv = 0.2 * torch.randn(H, n, L), torch.randn(H, V, L)
    want = mla_prefill_reference(q, cache, w_uk, w_uv, Tk - Tq, 0.2)
    assert rel_err(mla_prefill_sdpa(q, cache, w_uk, w_uv, Tk - Tq, 0.2), want) < 1e-5
    # Cached keys in several blocks (the last one short), merged by their log-sum-exp.
    assert rel_err(mla_prefill_sdpa(q, cache, w_uk, w_uv, Tk - Tq, 0.2, key_block=70), want) < 1e-5
