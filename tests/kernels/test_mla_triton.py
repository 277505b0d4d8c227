"""The Triton MLA decode kernel (split-K over the cache), run on CPU tensors through Triton's interpreter, against the float64 materialising reference.

The entry points are called directly: the dispatcher sends CPU tensors to PyTorch unless
KIMI_DESK_KERNELS=triton (its own test sets it). TRITON_INTERPRET is set by tests/conftest.py before
anything imports Triton; it is set here too for a lone run of this file.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
from kimi_desk.kernels.mla.decode import mla_decode  # noqa: E402
from kimi_desk.kernels.mla.naive import mla_attention_reference  # noqa: E402

# Relative error against float64 on the same rounded inputs, per cache dtype. The interpreter takes fp32
# operands, so it lands near 1e-7 for both; on a GPU the bf16 cache's products run in bf16 (the
# probabilities rounded to bf16 before the value product), measured 2e-3 to 4e-3 at the 48B shapes.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(a, b):
    assert not torch.isnan(a).any(), "NaN in the output (an element the kernel never wrote?)"
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_inputs(B, Tq, H, Tk, D, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq, H, D, generator=gen)
    # A view of a longer buffer, as the engine's growing cache passes it: the batch stride is not Tk * D.
    cache = torch.randn(B, Tk + 7, D, generator=gen).to(dtype)[:, :Tk]
    return q, cache


def run(q, cache, q_start, V, scale, **kw):
    B, Tq, H, _ = q.shape
    out = torch.full((B, Tq, H, V), float("nan"))
    got = mla_decode(q, cache, q_start, V, scale, out=out, **kw)
    assert got is out and got.dtype == torch.float32
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("Tq", [1, 3], ids=lambda x: f"Tq{x}")
@pytest.mark.parametrize("Tk", [1, 63, 200, 1000], ids=lambda x: f"Tk{x}")
def test_decode_matches_float64(dtype, Tq, Tk):
    """H = 4, D = 40 with value_dim 32: the rope width 8 is padded to 16 and masked."""
    B, H, D, V = 2, 4, 40, 32
    q, cache = make_inputs(B, Tq, H, Tk, D, dtype, seed=Tk * 3 + Tq)
    q_start = max(0, Tk - Tq)
    got = run(q, cache, q_start, V, 0.3)
    want = mla_attention_reference(q.to(dtype).float(), cache, q_start, V, 0.3)
    assert rel_err(got, want) < TOLERANCE[dtype]


def test_rows_with_no_visible_key_in_a_split():
    """Keys past the last query, a split holding only keys that the first query cannot see (its row
    is empty there), two row blocks (16 heads x 3 queries > 32 rows), power-of-two widths (D = 48,
    value_dim 32: the loads masked on the key axis only)."""
    B, Tq, H, D, V, Tk = 1, 3, 16, 48, 32, 150
    q_start = 111  # keys 0 .. 113 are visible to some query; block 7 (keys 112, 113) to query 0 none
    q, cache = make_inputs(B, Tq, H, Tk, D, torch.bfloat16, seed=5)
    got = run(q, cache, q_start, V, 0.25, num_splits=8, config=dict(block_n=16))
    want = mla_attention_reference(q.bfloat16().float(), cache, q_start, V, 0.25)
    assert rel_err(got, want) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("per_token", [True, False], ids=["per_token", "per_tensor"])
def test_fp8_cache(per_token):
    """An e4m3 cache with its scales, against float64 on the dequantised cache."""
    B, Tq, H, D, V, Tk = 2, 2, 4, 40, 32, 300
    q, cache = make_inputs(B, Tq, H, Tk, D, torch.float32, seed=9)
    cache = cache * torch.linspace(0.1, 30, Tk)[None, :, None]  # token magnitudes over two decades
    if per_token:
        scale = cache.abs().amax(-1) / 448
        c8 = (cache / scale[..., None]).to(torch.float8_e4m3fn)
        dequant = c8.float() * scale[..., None]
    else:
        scale = (cache.abs().max() / 448).item()
        c8 = (cache / scale).to(torch.float8_e4m3fn)
        dequant = c8.float() * scale
    got = run(q, c8, Tk - Tq, V, 0.05, k_scale=scale)
    want = mla_attention_reference(q.bfloat16().float(), dequant, Tk - Tq, V, 0.05)
    assert rel_err(got, want) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("Tq,filled", [(1, 1), (1, 700), (3, 260)], ids=lambda x: str(x))
def test_start_on_the_device_and_a_buffer_past_the_keys(Tq, filled):
    """How a recorded decode step calls the kernel: the whole preallocated buffer, its unfilled rows NaN,
    and the first query's position in a device tensor. Same result as an int position, bit for bit,
    and as the exact keys alone."""
    B, H, D, V = 1, 4, 40, 32
    q, cache = make_inputs(B, Tq, H, filled + 50, D, torch.float32, seed=filled)
    cache[:, filled:] = float("nan")
    q_start = filled - Tq
    got_int = run(q, cache, q_start, V, 0.3)
    got_tensor = run(q, cache, torch.tensor([q_start]), V, 0.3)
    assert torch.equal(got_int, got_tensor)
    want = mla_attention_reference(q, cache[:, :filled], q_start, V, 0.3)
    assert rel_err(got_int, want) < TOLERANCE[torch.float32]


def test_dispatcher_reads_no_row_past_the_queries_on_the_cpu():
    from kimi_desk.kernels.mla import mla_attention

    q, cache = make_inputs(1, 2, 4, 300, 40, torch.float32, seed=2)
    cache[:, 120:] = float("nan")
    got = mla_attention(q, cache, 118, 32, 0.3)
    want = mla_attention_reference(q, cache[:, :120], 118, 32, 0.3)
    assert rel_err(got, want) < 1e-5


def test_dispatcher_sends_absorbed_queries_to_the_kernel(monkeypatch):
    """Under KIMI_DESK_KERNELS=triton every absorbed query goes to mla_decode, given the whole buffer (NaN
    past the queries): one token, and the 63 of a question after a document (the model expands keys
    from 64 on)."""
    from kimi_desk.kernels.mla import decode, mla_attention

    calls = []
    real_decode = decode.mla_decode

    def spy_decode(q, *args, **kw):
        calls.append(q.shape[1])
        return real_decode(q, *args, **kw)

    monkeypatch.setattr(decode, "mla_decode", spy_decode)
    monkeypatch.setenv("KIMI_DESK_KERNELS", "triton")
    for Tq in (1, 63):
        q, cache = make_inputs(1, Tq, 2, 30 + Tq, 48, torch.float32, seed=Tq)
        cache = torch.cat([cache, torch.full((1, 9, 48), float("nan"))], dim=1)
        got = mla_attention(q, cache, 30, 32, 0.3)
        want = mla_attention_reference(q, cache[:, : 30 + Tq], 30, 32, 0.3)
        assert rel_err(got, want) < TOLERANCE[torch.float32]
    assert calls == [1, 63]
    monkeypatch.setenv("KIMI_DESK_KERNELS", "torch")
    mla_attention(q, cache, 30, 32, 0.3)
    assert len(calls) == 2
