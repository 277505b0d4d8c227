"""The PyTorch MLA attention paths against float64 materialising references."""

import pytest
import torch

from kimi_desk.kernels.mla import mla_attention, mla_prefill
from kimi_desk.kernels.mla.naive import mla_attention_reference, mla_prefill_reference
from kimi_desk.kernels.mla.torch_attention import mla_attention_cpu, mla_attention_dense, mla_prefill_sdpa

# Relative error against the float64 reference, per dtype of the queries.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# (queries, cache): a float32 model, a bfloat16 one, and a quantized model on a float32 CPU, whose cache
# is bfloat16 (engine/model.py `cache_dtype`): float32 products over the cache's values as they are.
DTYPES = pytest.mark.parametrize(
    "dtype,cache_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)],
    ids=["fp32", "bf16", "bf16-cache"],
)


def rel_err(a, b):
    assert not torch.isnan(a).any()
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def poisoned_cache(B, Tk, width, dtype, spare=5):
    """A cache of Tk tokens in a longer buffer whose unfilled rows hold NaN: they must never be read."""
    buffer = torch.full((B, Tk + spare, width), float("nan"))
    buffer[:, :Tk] = torch.randn(B, Tk, width)
    return buffer.to(dtype)


@DTYPES
@pytest.mark.parametrize(
    "B,Tq,Tk,H",
    [(1, 1, 1, 2), (2, 1, 3000, 4), (1, 5, 300, 3), (1, 63, 1000, 3), (2, 700, 700, 2), (1, 300, 2100, 2)],
    ids=lambda x: str(x),
)
def test_absorbed_attention(B, Tq, Tk, H, dtype, cache_dtype):
    L, R = 32, 8
    q, cache = torch.randn(B, Tq, H, L + R).to(dtype), poisoned_cache(B, Tk, L + R, cache_dtype)
    want = mla_attention_reference(q, cache[:, :Tk], Tk - Tq, L, 0.2)
    # Cached keys in several blocks, the last one short.
    got = mla_attention_cpu(q, cache, Tk - Tq, L, 0.2, block=256)
    assert got.dtype == torch.float32 and rel_err(got, want) < TOLERANCE[dtype]
    assert rel_err(mla_attention(q, cache, Tk - Tq, L, 0.2), want) < TOLERANCE[dtype]


@DTYPES
@pytest.mark.parametrize(
    "B,Tq,Tk,H", [(1, 1, 1, 2), (1, 64, 64, 4), (2, 300, 1000, 3), (1, 1000, 1000, 2)], ids=lambda x: str(x)
)
def test_expanded_prefill(B, Tq, Tk, H, dtype, cache_dtype):
    n, R, L, V = 16, 8, 32, 16
    q, cache = torch.randn(B, Tq, H, n + R).to(dtype), poisoned_cache(B, Tk, L + R, cache_dtype)
    w_uk, w_uv = (0.2 * torch.randn(H, n, L)).to(dtype), torch.randn(H, V, L).to(dtype)
    want = mla_prefill_reference(q, cache[:, :Tk], w_uk, w_uv, Tk - Tq, 0.2)
    got = mla_prefill_sdpa(q, cache[:, :Tk], w_uk, w_uv, Tk - Tq, 0.2, key_block=96)
    assert got.dtype == torch.float32 and rel_err(got, want) < TOLERANCE[dtype]
    assert rel_err(mla_prefill(q, cache[:, :Tk], w_uk, w_uv, Tk - Tq, 0.2), want) < TOLERANCE[dtype]


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
def test_gpu_dense_form_on_cpu_tensors(Tq, Tk):
    """The GPU's PyTorch decode form (KIMI_DESK_KERNELS=torch on CUDA) is plain PyTorch: check it here."""
    H, L, R = 3, 32, 8
    cache = torch.randn(2, Tk, L + R)
    q_abs = torch.randn(2, Tq, H, L + R)
    want = mla_attention_reference(q_abs, cache, Tk - Tq, L, 0.2)
    assert rel_err(mla_attention_dense(q_abs, cache, Tk - Tq, L, 0.2), want) < 1e-5


def test_extreme_scores_stay_finite():
    """Scores far apart (a key aligned with the query, large norms) across key blocks: the merge of the
    blocks' log-sum-exps neither overflows nor loses the dominant key."""
    H, L, R, Tk = 2, 32, 8, 700
    cache = torch.randn(1, Tk, L + R)
    cache[0, 100] *= 30
    q = cache[0, 100].expand(1, 1, H, L + R).clone()
    want = mla_attention_reference(q, cache, Tk - 1, L, 0.2)
    got = mla_attention_cpu(q, cache, Tk - 1, L, 0.2, block=128)
    assert torch.isfinite(got).all() and rel_err(got, want) < 1e-5


@DTYPES
@pytest.mark.parametrize("Tq", [1, 3])
@pytest.mark.parametrize("cached", [0, 1, 127, 128, 129, 1000, 4099])
def test_cpu_decode_blocks(cached, Tq, dtype, cache_dtype):
    """The CPU decode's pass over the cached keys block by block: lengths below, at and past a block,
    none a multiple of it but one, and no cached keys at all."""
    B, H, L, R = 2, 5, 32, 8
    q, cache = torch.randn(B, Tq, H, L + R).to(dtype), poisoned_cache(B, cached + Tq, L + R, cache_dtype)
    want = mla_attention_reference(q, cache[:, : cached + Tq], cached, L, 0.2)
    got = mla_attention_cpu(q, cache, cached, L, 0.2, block=128)
    assert got.dtype == torch.float32 and rel_err(got, want) < TOLERANCE[dtype]
    assert rel_err(mla_attention_cpu(q, cache, cached, L, 0.2), want) < TOLERANCE[dtype]


def test_cpu_decode_scores_in_float32():
    """Scores far from zero but close to each other (the shared key part large and alike in every key):
    rounded to bf16 they would be off by about 0.4% of their size, about half a unit here; the remainder
    product keeps them float32."""
    H, L, R, Tk = 4, 64, 16, 3000
    cache = torch.cat([torch.randn(1, Tk, L), 3 + 0.01 * torch.randn(1, Tk, R)], dim=-1).to(torch.bfloat16)
    q = torch.cat([0.3 * torch.randn(1, 1, H, L), torch.full((1, 1, H, R), 3.0)], dim=-1).to(torch.bfloat16)
    want = mla_attention_reference(q, cache, Tk - 1, L, 1.0)
    got = mla_attention_cpu(q, cache, Tk - 1, L, 1.0, block=1024)
    rounded = torch.einsum("bqhd,bkd->bqhk", q.float(), cache.float()).to(torch.bfloat16).float()
    rounded_out = torch.einsum("bqhk,bkd->bqhd", rounded.softmax(-1), cache[..., :L].float())
    assert rel_err(got, want) < 1e-2 < rel_err(rounded_out, want)
