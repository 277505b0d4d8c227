"""The routed-experts grouped GEMM (prefill), run on CPU tensors through Triton's interpreter, against a
float64 reference and the grouped PyTorch path; with weights in x's dtype and in fp8 with per-row scales
(kernels/quant); and the dispatcher's choice of it for many tokens.

TRITON_INTERPRET is set by tests/conftest.py before anything imports Triton; it is set here too for a
lone run of this file.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
from moe_cases import make_inputs, quantize_experts, reference_f64, rel_err, spoil_fp8_experts  # noqa: E402

from kimi_desk.kernels.moe import (  # noqa: E402
    GEMV_MAX_TOKENS,
    grouped,  # noqa: E402
    routed_experts,
    routed_experts_grouped,
)
from kimi_desk.kernels.moe.grouped import route_pairs, routed_experts_grouped_triton  # noqa: E402

# Relative error against float64 on the same rounded weights and inputs. fp32: exact products ("ieee"
# dots), fp32 sums. bf16 and fp16: h is rounded to x's dtype between the products (the PyTorch path
# rounds gate and up too); both land within a few ulps of float64.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}

# Small tiles: several row blocks per expert, several column and reduction blocks, partial ones.
SMALL_TILES = dict(block_m=16, block_n=16, block_k=16)


# N * k against the row blocks: 5 (one token, so at most one pair per expert), 10 and 111 pairs, none a
# multiple of the default block_m; D and I not powers of two, below and above one tile.
SHAPES = [(1, 8, 3, 40, 24), (5, 4, 2, 72, 40), (37, 8, 3, 100, 70)]
CONFIGS = {"default": None, "small": SMALL_TILES}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N,E,k,D,I", SHAPES, ids=lambda x: str(x))
def test_grouped_matches_float64_and_torch(N, E, k, D, I, dtype, config):
    inputs = make_inputs(N, E, k, D, I, dtype, seed=N * 7 + D)
    got = routed_experts_grouped_triton(*inputs, config=config)
    assert got.dtype == torch.float32 and got.shape == (N, D)
    assert rel_err(got, reference_f64(*inputs)) < TOLERANCE[dtype]
    assert rel_err(got, routed_experts_grouped(*inputs)) < TOLERANCE[dtype]


def test_fp16_matches_float64():
    inputs = make_inputs(9, 4, 2, 48, 40, torch.float16, seed=2)
    got = routed_experts_grouped_triton(*inputs, config=SMALL_TILES)
    assert rel_err(got, reference_f64(*inputs)) < TOLERANCE[torch.float16]


# Against float64 on the dequantized weights. The kernel takes exact products of x and Q and applies
# the scales to fp32 sums, so fp32 sees summation order only; bf16 its rounding of h (and of x).
FP8_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# Against the PyTorch path, which rounds gate, up, h and the dequantized weights to bf16 as well: its own
# error against float64 reached 1.4e-2 at one token over 60 draws of the row scales (the kernel's 5.6e-3),
# their difference 1.6e-2 there and 2.1e-2 once in CI, so the bound is the two paths' errors together.
FP8_TORCH_PATH_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 4e-2}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N,E,k,D,I", SHAPES, ids=lambda x: str(x))
def test_fp8_experts_match_float64_and_torch(N, E, k, D, I, dtype, config):
    x, ids, weights, w1, w2, w3 = make_inputs(N, E, k, D, I, torch.float32, seed=N * 13 + D)
    # Rows of very different sizes: a scale applied to the wrong row, or not at all, would show.
    w1, w3 = (w * torch.logspace(-1, 1, I)[torch.randperm(I)][:, None] for w in (w1, w3))
    w2 = w2 * torch.logspace(-1, 1, D)[torch.randperm(D)][:, None]
    (q1, q2, q3), scales, exact = quantize_experts(w1, w2, w3)
    x = x.to(dtype)
    got = routed_experts_grouped_triton(x, ids, weights, q1, q2, q3, scales=scales, config=config)
    assert got.dtype == torch.float32 and got.shape == (N, D)
    assert rel_err(got, reference_f64(x, ids, weights, *exact)) < FP8_TOLERANCE[dtype]
    want = routed_experts_grouped(x, ids, weights, q1, q2, q3, scales=scales)
    assert rel_err(got, want) < FP8_TORCH_PATH_TOLERANCE[dtype]


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N,E,k,D,I", [(40, 6, 3, 128, 64), (70, 8, 2, 320, 96)], ids=lambda x: str(x))
def test_int8_and_int4_experts_match_float64_and_torch(fmt, N, E, k, D, I, dtype):
    """int4 tiles unpacked and dequantized in registers, groups of 128/64 (D) and 64/32 (I)."""
    x, ids, weights, w1, w2, w3 = make_inputs(N, E, k, D, I, torch.float32, seed=N * 11 + D)
    codes, scales, exact = quantize_experts(w1, w2, w3, fmt)
    x = x.to(dtype)
    got = routed_experts_grouped_triton(x, ids, weights, *codes, scales=scales, config={**SMALL_TILES, "block_k": 32})
    assert got.dtype == torch.float32 and got.shape == (N, D)
    assert rel_err(got, reference_f64(x, ids, weights, *exact)) < FP8_TOLERANCE[dtype] * (3 if fmt == "int4" else 1)
    want = routed_experts_grouped(x, ids, weights, *codes, scales=scales)
    # The PyTorch path's int8 operator multiplies a few tokens in bf16 (kernels/quant/cpu.py).
    torch_path = torch.bfloat16 if fmt == "int8" else dtype
    assert rel_err(got, want) < FP8_TORCH_PATH_TOLERANCE[torch_path] * (3 if fmt == "int4" else 1)


def crowded_ids(N, E, k, popular, nobody, seed):
    """ids [N, k] where every token chooses expert `popular` and no token chooses those in `nobody`."""
    gen = torch.Generator().manual_seed(seed)
    others = torch.tensor([e for e in range(E) if e != popular and e not in nobody])
    rest = torch.stack([others[torch.randperm(len(others), generator=gen)[: k - 1]] for _ in range(N)])
    ids = torch.cat([torch.full((N, 1), popular), rest], 1)
    # The popular expert in every position j, so that its pairs are not one stride apart.
    return torch.stack([row.roll(n % k) for n, row in enumerate(ids)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_crowded_and_unchosen_experts(dtype):
    """An expert chosen by all 37 tokens spans three row blocks of 16 (the last partial); experts nobody
    chose hold NaN, which must not reach the output; N * k = 111 is no multiple of 16."""
    N, E, k, D, I = 37, 8, 3, 48, 40
    x, _, weights, w1, w2, w3 = make_inputs(N, E, k, D, I, dtype, seed=21)
    ids = crowded_ids(N, E, k, popular=5, nobody=(0, 3), seed=1)
    for w in (w1, w2, w3):
        w[[0, 3]] = float("nan")
    got = routed_experts_grouped_triton(x, ids, weights, w1, w2, w3, config=dict(block_m=16))
    assert rel_err(got, reference_f64(x, ids, weights, w1, w2, w3)) < TOLERANCE[dtype]
    assert rel_err(got, routed_experts_grouped(x, ids, weights, w1, w2, w3)) < TOLERANCE[dtype]


def test_fp8_unchosen_experts_are_never_read():
    """fp8 experts nobody chose: NaN codes in the weights, NaN and inf in the scales."""
    N, E, k, D, I = 37, 8, 3, 48, 40
    x, _, weights, w1, w2, w3 = make_inputs(N, E, k, D, I, torch.float32, seed=22)
    ids = crowded_ids(N, E, k, popular=2, nobody=(0, 3, 7), seed=2)
    (q1, q2, q3), (s1, s2, s3), exact = quantize_experts(w1, w2, w3)
    want = reference_f64(x, ids, weights, *exact)
    spoil_fp8_experts((q1, q2, q3), (s1, s2, s3), nan_scales=(0, 7), inf_scales=(3,))
    got = routed_experts_grouped_triton(x, ids, weights, q1, q2, q3, scales=(s1, s2, s3), config=dict(block_m=16))
    assert rel_err(got, want) < 1e-5


def test_every_pair_row_is_written(monkeypatch):
    """The scratch h and y start as NaN: every pair's row of each must be written (none skipped by the
    row blocks), and nothing else read."""
    real_empty = torch.empty

    def nan_empty(*shape, dtype=None, device=None):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(grouped.torch, "empty", nan_empty)
    inputs = make_inputs(37, 8, 3, 48, 40, torch.float32, seed=23)
    got = routed_experts_grouped_triton(*inputs, config=dict(block_m=16))
    monkeypatch.setattr(grouped.torch, "empty", real_empty)
    assert rel_err(got, reference_f64(*inputs)) < 1e-5


@pytest.mark.parametrize("N,E,k,block_m", [(1, 4, 1, 16), (37, 8, 3, 16), (200, 4, 2, 16), (5, 64, 8, 64)])
def test_route_pairs(N, E, k, block_m):
    """Each pair appears in exactly one row of one block of its own expert; the grid's bound covers the
    real blocks, and the blocks past them are marked expert E."""
    gen = torch.Generator().manual_seed(N + E)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(N)])
    if N == 200:
        ids[:150, 0] = 1  # one expert in most rows: several of its blocks
    r, num_blocks = route_pairs(ids, E, block_m)
    flat = ids.reshape(-1)
    seen = []
    for b in range(num_blocks):
        e = int(r["block_expert"][b])
        if e == E:
            continue
        rows = (b - int(r["block_start"][e])) * block_m + torch.arange(block_m)
        rows = rows[rows < r["counts"][e]]
        pairs = r["order"][r["pair_start"][e] + rows]
        assert (flat[pairs] == e).all()
        seen += pairs.tolist()
    assert sorted(seen) == list(range(N * k))
    real = int(((r["counts"] + block_m - 1) // block_m).sum())
    assert real <= num_blocks and (r["block_expert"][real:] == E).all()


def test_dispatcher_sends_prefill_to_the_grouped_kernel(monkeypatch):
    """Under KIMI_DESK_KERNELS=triton, more than GEMV_MAX_TOKENS tokens take the grouped GEMM, with the
    grouped PyTorch path's result; KIMI_DESK_KERNELS=torch keeps them on PyTorch."""
    calls = []
    real = grouped.routed_experts_grouped_triton

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(grouped, "routed_experts_grouped_triton", counted)
    N = GEMV_MAX_TOKENS + 3
    inputs = make_inputs(N, 6, 2, 40, 24, torch.float32, seed=9)
    monkeypatch.setenv("KIMI_DESK_KERNELS", "triton")
    got = routed_experts(*inputs)
    assert calls == [N]
    assert rel_err(got, routed_experts_grouped(*inputs)) < 1e-5
    routed_experts(*(t[:GEMV_MAX_TOKENS] for t in inputs[:3]), *inputs[3:])
    assert calls == [N], "up to GEMV_MAX_TOKENS tokens take the GEMV"
    monkeypatch.setenv("KIMI_DESK_KERNELS", "torch")
    routed_experts(*inputs)
    assert calls == [N]
