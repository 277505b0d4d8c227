"""The Triton MLA kernels, decode (split-K) and prefill (many queries), run on CPU tensors through
Triton's interpreter, against the float64 materialising reference.

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


# The prefill kernel (kernels/mla/prefill.py): many absorbed queries, one program per row block.


def run_prefill(q, cache, q_start, V, scale, **kw):
    from kimi_desk.kernels.mla.prefill import mla_prefill_absorbed

    B, Tq, H, _ = q.shape
    out = torch.full((B, Tq, H, V), float("nan"))
    got = mla_prefill_absorbed(q, cache, q_start, V, scale, out=out, **kw)
    assert got is out and got.dtype == torch.float32
    return got


def make_prefill_inputs(B, Tq, H, q_start, D, dtype, seed, garbage=9):
    """The cache holds q_start + Tq keys and `garbage` NaN rows after them, as a preallocated buffer does."""
    q, cache = make_inputs(B, Tq, H, q_start + Tq + garbage, D, dtype, seed)
    cache[:, q_start + Tq :] = float("nan")
    return q, cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("Tq", [17, 40, 70], ids=lambda x: f"Tq{x}")
@pytest.mark.parametrize("q_start", [0, 5, 100], ids=lambda x: f"start{x}")
def test_prefill_matches_float64(dtype, Tq, q_start):
    """L = 32, R = 16 (D = 48); B and H vary with the case. Several row blocks (the last one partial),
    key blocks before the diagonal and on it, NaN rows past the last query."""
    B, H = 1 + Tq % 2, 2 + q_start % 2
    q, cache = make_prefill_inputs(B, Tq, H, q_start, 48, dtype, seed=Tq * 7 + q_start)
    got = run_prefill(q, cache, q_start, 32, 0.3)
    want = mla_attention_reference(q.to(dtype).float(), cache[:, : q_start + Tq], q_start, 32, 0.3)
    assert rel_err(got, want) < TOLERANCE[dtype]


@pytest.mark.parametrize("config", [dict(block_m=16, block_n=16), dict(block_v=16), dict(block_m=32, block_n=64)],
                         ids=["small_blocks", "value_slices", "wide_keys"])
def test_prefill_launch_settings_and_odd_widths(config):
    """D = 40, value_dim 24: both feature pieces padded and masked (32 and 16). Row blocks of 16 with 3
    heads cut queries in two; value slices recompute the scores per slice; key blocks wider than a row
    block's range."""
    B, Tq, H, q_start, D, V = 2, 33, 3, 21, 40, 24
    q, cache = make_prefill_inputs(B, Tq, H, q_start, D, torch.bfloat16, seed=3)
    got = run_prefill(q, cache, q_start, V, 0.25, config=config)
    want = mla_attention_reference(q.bfloat16().float(), cache[:, : q_start + Tq], q_start, V, 0.25)
    assert rel_err(got, want) < TOLERANCE[torch.bfloat16]


def test_prefill_row_blocks_read_no_key_past_their_last_query():
    """Keys after the first row block's last query, poisoned with NaN: that block's rows come out the
    same, bit for bit. Rows of 16 with 3 heads: block 0 holds queries 0 .. 4 and query 5's first head."""
    B, Tq, H, q_start, D, V = 1, 20, 3, 37, 48, 32
    q, cache = make_prefill_inputs(B, Tq, H, q_start, D, torch.float32, seed=4)
    cfg = dict(block_m=16, block_n=16)
    clean = run_prefill(q, cache, q_start, V, 0.3, config=cfg)
    poisoned = cache.clone()
    poisoned[:, q_start + 6 :] = float("nan")
    got = run_prefill(q, poisoned, q_start, V, 0.3, config=cfg)
    assert torch.equal(got[:, :5], clean[:, :5]) and torch.equal(got[:, 5, 0], clean[:, 5, 0])
    want = mla_attention_reference(q, cache[:, : q_start + Tq], q_start, V, 0.3)
    assert rel_err(clean, want) < TOLERANCE[torch.float32]


def test_prefill_start_on_the_device():
    """The first query's position in a device tensor: the same result as an int, bit for bit."""
    q, cache = make_prefill_inputs(2, 24, 2, 50, 48, torch.bfloat16, seed=6)
    got_int = run_prefill(q, cache, 50, 32, 0.3)
    got_tensor = run_prefill(q, cache, torch.tensor([50]), 32, 0.3)
    assert torch.equal(got_int, got_tensor)


def test_dispatcher_sends_many_queries_to_the_prefill_kernel(monkeypatch):
    """Under KIMI_DESK_KERNELS=triton: up to TRITON_MAX_QUERIES queries go to mla_decode, from
    PREFILL_KERNEL_MIN_QUERIES to mla_prefill_absorbed, those between to the dense PyTorch form; each
    given the whole buffer (NaN past the queries)."""
    from kimi_desk.kernels.mla import PREFILL_KERNEL_MIN_QUERIES, TRITON_MAX_QUERIES, decode, mla_attention, prefill

    calls = []
    real_decode, real_prefill = decode.mla_decode, prefill.mla_prefill_absorbed

    def spy_decode(q, *args, **kw):
        calls.append(("decode", q.shape[1]))
        return real_decode(q, *args, **kw)

    def spy_prefill(q, *args, **kw):
        calls.append(("prefill", q.shape[1]))
        return real_prefill(q, *args, **kw)

    monkeypatch.setattr(decode, "mla_decode", spy_decode)
    monkeypatch.setattr(prefill, "mla_prefill_absorbed", spy_prefill)
    monkeypatch.setenv("KIMI_DESK_KERNELS", "triton")
    for Tq in (TRITON_MAX_QUERIES, TRITON_MAX_QUERIES + 1, PREFILL_KERNEL_MIN_QUERIES):
        q, cache = make_prefill_inputs(1, Tq, 2, 30, 48, torch.float32, seed=Tq)
        got = mla_attention(q, cache, 30, 32, 0.3)
        want = mla_attention_reference(q, cache[:, : 30 + Tq], 30, 32, 0.3)
        assert rel_err(got, want) < TOLERANCE[torch.float32]
    assert calls == [("decode", TRITON_MAX_QUERIES), ("prefill", PREFILL_KERNEL_MIN_QUERIES)]
    monkeypatch.setenv("KIMI_DESK_KERNELS", "torch")
    mla_attention(q, cache, 30, 32, 0.3)
    assert len(calls) == 2
