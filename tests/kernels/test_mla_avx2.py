"""MLA's AVX2 decode attention (kernels/mla/avx2.py, attention_avx2.c) against the float64 reference, on
fresh random inputs: one part and many, a batch, several rows (from 2 to the 48B model's 32 heads and 64
rows, the kernel's blocks of 4 rows with every remainder, 1 or 3 keys a step), large scores (the online
softmax's rescaling), a cache in a longer buffer whose unfilled rows hold NaN; a float32 and a bfloat16
cache (float32 queries: the quantized models on a float32 CPU), each against its own values in float64.
The products around the attention on kv_b_proj's bfloat16 weight, against float64 and through the
dispatchers the model calls."""

import pytest
import torch
from test_mla_torch import poisoned_cache, rel_err
from test_quant_avx2 import can_build

from kimi_desk.kernels.mla import absorb_queries, avx2, values
from kimi_desk.kernels.mla.naive import mla_attention_reference
from kimi_desk.kernels.mla.torch_attention import mla_attention_cpu


def test_kernel_builds_where_it_can():
    assert (avx2.library() is not None) == can_build(), avx2.native.reason(avx2.SOURCE)


@pytest.mark.parametrize(
    "B,Tq,Tk,H,L,scale",
    [
        (1, 1, 1, 5, 64, 0.2),  # the first token: its own key alone
        (1, 1, 2, 5, 64, 0.2),
        (1, 1, 3000, 5, 128, 0.2),
        (2, 3, 1500, 4, 64, 0.2),
        (1, 1, 9000, 2, 64, 3.0),
        (1, 1, 2500, 32, 512, 0.05),  # the 48B model's heads and latents
        (2, 2, 700, 32, 128, 0.2),  # 64 rows, the most a call takes
        (1, 1, 37, 3, 64, 0.2),  # fewer keys than a block, in no multiple of the 3 keys a step takes
    ],
    ids=lambda x: str(x),
)
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_matches_float64(B, Tq, Tk, H, L, scale, cache_dtype):
    if avx2.library() is None:
        pytest.skip(avx2.native.reason(avx2.SOURCE))
    R = 32
    q, cache = torch.randn(B, Tq, H, L + R), poisoned_cache(B, Tk, L + R, cache_dtype)
    assert avx2.takes(cache, L, Tq * H)
    want = mla_attention_reference(q, cache[:, :Tk], Tk - Tq, L, scale)
    got = mla_attention_cpu(q, cache, Tk - Tq, L, scale)
    assert got.dtype == torch.float32 and rel_err(got, want) < 1e-5


def test_parts_merge_like_one_pass():
    """The parts of the keys give, merged, what one part gives."""
    if avx2.library() is None:
        pytest.skip(avx2.native.reason(avx2.SOURCE))
    rows, cache = torch.randn(1, 5, 96) * 0.3, torch.randn(1, 4096, 96)
    parts = avx2.attend_cached(rows, cache, 4096, 64)
    assert parts[0].shape[0] > 1

    def merged(maxima, sums, partials):
        w = (maxima - maxima.amax(0)).exp()
        return (partials * w.unsqueeze(-1)).sum(0) / (sums * w).sum(0).unsqueeze(-1)

    s = (rows.double() @ cache.double().transpose(1, 2)).softmax(-1)
    want = s @ cache.double()[..., :64]
    assert rel_err(merged(*parts), want) < 1e-5


@pytest.mark.parametrize(
    "R,D,V,keys,threads,parts",
    [
        (32, 576, 512, 1043, 16, 16),  # the 48B model's heads at 1k keys: one part per thread (was 2)
        (32, 576, 512, 40, 16, 1),  # fewer keys than two blocks: one part
        (32, 576, 512, 100000, 16, 64),  # at most four parts a thread
        (5, 160, 128, 3000, 16, 5),  # the demo model's one token: a part per 512 keys, as measured
    ],
)
def test_keys_split_by_the_work_they_carry(monkeypatch, R, D, V, keys, threads, parts):
    """Parts by multiply-adds (rows x widths x keys), at least two blocks of keys each, at most four a
    thread; merged, they give the float64 attention."""
    if avx2.library() is None:
        pytest.skip(avx2.native.reason(avx2.SOURCE))
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    rows, cache = torch.randn(1, R, D) * D**-0.5, torch.randn(1, keys, D)
    maxima, sums, partials = avx2.attend_cached(rows, cache, keys, V)
    assert maxima.shape[0] == parts
    w = (maxima - maxima.amax(0)).exp()
    got = (partials * w.unsqueeze(-1)).sum(0) / (sums * w).sum(0).unsqueeze(-1)
    want = (rows.double() @ cache.double().transpose(1, 2)).softmax(-1) @ cache.double()[..., :V]
    assert rel_err(got, want) < 1e-5


def test_many_rows_keep_pytorchs_products():
    cache = torch.randn(1, 10, 96)
    assert not avx2.takes(cache, 64, avx2.MAX_ROWS + 1)
    assert not avx2.takes(cache.half(), 64, 1)
    assert not avx2.takes(torch.randn(1, 10, 72), 40, 1)


@pytest.mark.parametrize(
    "B,T,H,n,v,L",
    [(1, 1, 32, 128, 128, 512), (2, 3, 5, 64, 64, 128), (1, 2, 3, 24, 20, 192)],  # the 48B model's; the demo's; odd
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_products_on_the_weight_as_stored_match_float64(B, T, H, n, v, L, dtype):
    """W_UK^T q_nope beside q_rope and W_UV a, W read from kv_b_proj's weight as stored (bfloat16, or
    float32 where the model computes in it); q a strided slice, as the model's projection output gives
    it."""
    if avx2.library() is None:
        pytest.skip(avx2.native.reason(avx2.SOURCE))
    gen = torch.Generator().manual_seed(T * 100 + L)
    R = 16
    weight = (torch.randn(H * (n + v), L, generator=gen) * 0.1).to(dtype)
    assert avx2.reads_weight(weight, v)
    q = torch.randn(B, T, H * (n + R) + 8, generator=gen).to(dtype)[..., 8:].view(B, T, H, n + R)
    got = absorb_queries(q, weight, n, v, dtype)
    w = weight.double().view(H, n + v, L)
    want = torch.cat([torch.einsum("bthn,hnl->bthl", q[..., :n].double(), w[:, :n]), q[..., n:].double()], dim=-1)
    assert got.dtype == torch.float32 and got.shape == (B, T, H, L + R)
    assert rel_err(got, want) < 1e-6
    attended = torch.randn(B, T, H, L, generator=gen)
    got = values(attended, weight, n, v, torch.float32)
    want = torch.einsum("bthl,hvl->bthv", attended.double(), w[:, n:])
    assert got.shape == (B, T, H, v) and rel_err(got, want) < 1e-6
    assert values(attended, weight, n, v, torch.bfloat16).dtype == torch.bfloat16


def test_other_weights_keep_pytorchs_products():
    weight = torch.randn(4 * 48, 128)
    assert not avx2.reads_weight(weight.half(), 16)  # float16: PyTorch's products
    assert not avx2.reads_weight(weight.bfloat16()[:, :96], 16)  # not contiguous
    assert not avx2.reads_weight(torch.randn(4 * 48, 96).bfloat16(), 16)  # latents not in 64s
