"""The fp8 GEMV kernel (kernels/quant/gemv.py), run on CPU tensors through Triton's interpreter, against a
float64 product on the dequantized weight; and the dispatch that sends a few rows to it.

TRITON_INTERPRET is set by tests/conftest.py before anything imports Triton; it is set here too for a lone
run of this file.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
import kimi_desk.kernels.quant.gemv as gemv  # noqa: E402
from kimi_desk.kernels.quant import GEMV_MAX_TOKENS, quantize_fp8_rows, row_scaled_linear  # noqa: E402
from kimi_desk.kernels.quant.gemv import launch_shape, row_scaled_gemv  # noqa: E402

# Relative error against float64 on the same fp8 weight and inputs. The products are exact and summed in
# fp32, so fp32 sees summation order only; bf16 sees the one rounding of y to bf16 (2^-9 relative at most).
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 4e-3}


def rel_err(a, b):
    assert not torch.isnan(a).any(), "NaN in the output (an element the kernel never wrote?)"
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_inputs(N, D, O, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    # Rows of very different sizes: a scale applied to the wrong row would show.
    w = torch.randn(O, D, generator=gen) * torch.logspace(-2, 2, O)[torch.randperm(O, generator=gen), None]
    q, scale = quantize_fp8_rows(w)
    x = torch.randn(N, D, generator=gen).to(dtype)
    return x, q, scale


def reference_f64(x, q, scale):
    return x.double() @ (q.double() * scale.double()[:, None]).T


@pytest.mark.parametrize("cores", [False, True], ids=["dots", "cores"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N", [1, 3, 16])
@pytest.mark.parametrize("D,O", [(200, 70), (320, 960), (1000, 24)], ids=lambda x: str(x))
def test_gemv_matches_float64(dtype, N, D, O, cores):
    """D and O not multiples of the blocks (masked tiles). (200, 70): two row blocks, two splits of one
    width block. (320, 960): 15 row blocks, three splits. (1000, 24): one row block of 32 (O padded),
    eight splits, the last one short. `cores`: one token takes the CUDA cores (more rows the dots)."""
    x, q, scale = make_inputs(N, D, O, dtype, seed=N * 7 + D + O)
    got = row_scaled_gemv(x, q, scale, config={"cores": cores})
    assert got.dtype == dtype and got.shape == (N, O)
    assert rel_err(got, reference_f64(x, q, scale)) < TOLERANCE[dtype]


def test_gemv_without_a_split_and_with_leading_dims():
    """O large enough for MIN_PROGRAMS row blocks: one split, y written directly in x's dtype."""
    D, O = 48, gemv.MIN_PROGRAMS * gemv.CONFIG["block_o"]
    x, q, scale = make_inputs(6, D, O, torch.bfloat16, seed=9)
    got = row_scaled_gemv(x.view(2, 3, D), q, scale)
    assert got.shape == (2, 3, O)
    assert rel_err(got.view(6, O), reference_f64(x, q, scale)) < TOLERANCE[torch.bfloat16]


def test_gemv_of_strided_rows():
    """A slice of a wider tensor: rows strided, last axis contiguous."""
    x, q, scale = make_inputs(4, 200, 70, torch.float32, seed=10)
    wide = torch.cat([x, torch.full((4, 56), float("nan"))], 1)
    got = row_scaled_gemv(wide[:, :200], q, scale)
    assert rel_err(got, reference_f64(x, q, scale)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize(
    "O,D,programs",
    [(4096, 2304, 384), (2304, 2304, 360), (1024, 2304, 288), (2304, 4096, 288), (163840, 2304, 5120), (32, 2304, 18)],
    ids=lambda x: str(x),
)
def test_split_k_fills_an_h100(O, D, programs):
    """The 48B model's shapes: at least two programs per SM of a 132-SM H100, unless the width runs out of
    blocks (O = 32: one row block, 18 splits of one width block each)."""
    BO, BD, n_o, splits, chunk = launch_shape(O, D)
    assert n_o * splits == programs and n_o * BO >= O
    assert (splits - 1) * chunk < D <= splits * chunk and chunk % BD == 0
    assert programs >= gemv.MIN_PROGRAMS or chunk == BD


def test_dispatch_sends_a_few_rows_to_the_gemv(monkeypatch):
    calls = []

    def spy(x, q, scale):
        calls.append(x.shape)
        return row_scaled_gemv(x, q, scale)

    monkeypatch.setattr(gemv, "row_scaled_gemv", spy)
    monkeypatch.setenv("KIMI_DESK_KERNELS", "triton")
    x, q, scale = make_inputs(GEMV_MAX_TOKENS + 1, 64, 40, torch.float32, seed=11)
    want = reference_f64(x, q, scale)
    got = row_scaled_linear(x[:GEMV_MAX_TOKENS].view(2, GEMV_MAX_TOKENS // 2, 64), q, scale)
    assert calls == [(2, GEMV_MAX_TOKENS // 2, 64)]
    assert rel_err(got.view(GEMV_MAX_TOKENS, 40), want[:GEMV_MAX_TOKENS]) < TOLERANCE[torch.float32]
    # One row more: the PyTorch form (the dequantized weight, rounded to fp32: within fp32 of float64).
    assert rel_err(row_scaled_linear(x, q, scale), want) < 1e-6 and len(calls) == 1
    monkeypatch.setenv("KIMI_DESK_KERNELS", "torch")
    row_scaled_linear(x[:1], q, scale)
    assert len(calls) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_split_k_reduces_in_the_kernel(dtype):
    """The last split of each row block sums the partials in split order and writes y: the same result
    on every call, against float64 and against one split (no partials), and the shared counters are left
    at zero for the next call."""
    from kimi_desk.kernels import zeroed_counters

    D, O, N = 320, 96, 3
    x, q, scale = make_inputs(N, D, O, dtype, seed=11)
    config = {"block_o": 32, "block_d": 32, "min_programs": 64}
    _, _, n_o, splits, _ = launch_shape(O, D, config)
    assert splits > 1
    first = row_scaled_gemv(x, q, scale, config=config)
    counters = zeroed_counters(x.device, n_o)
    for _ in range(2):
        got = row_scaled_gemv(x, q, scale, config=config)
        assert torch.equal(got, first)
        assert torch.equal(counters, torch.zeros_like(counters))
    assert rel_err(got, row_scaled_gemv(x, q, scale, config={**config, "min_programs": 1})) < TOLERANCE[dtype]
    assert rel_err(got, reference_f64(x, q, scale)) < TOLERANCE[dtype]


def test_never_splitting_is_a_setting():
    _, _, n_o, splits, chunk = launch_shape(2304, 2304, {"min_programs": 1, "block_o": 16})
    assert (n_o, splits, chunk) == (144, 1, 2304)


@pytest.mark.parametrize("N", [1, 5])
def test_unscaled_float32_weight_router_logits(monkeypatch, N):
    """The router's logits (kimi_desk.kernels.moe.router_logits): a bf16 x against a float32 weight [E, D],
    no scale, float32 out, against float64. The interpreter multiplies in fp32 (a GPU takes three TF32
    products: 21 bits of the weight), so the bound is fp32 summation's."""
    from kimi_desk.kernels.moe import router_logits

    gen = torch.Generator().manual_seed(N)
    E, D = 40, 300
    w = torch.randn(E, D, generator=gen)
    x = torch.randn(N, D, generator=gen).to(torch.bfloat16)
    want = x.double() @ w.double().T
    got = row_scaled_gemv(x, w, None, out_dtype=torch.float32)
    assert got.dtype == torch.float32 and rel_err(got, want) < 1e-6
    monkeypatch.setenv("KIMI_DESK_KERNELS", "triton")
    assert torch.equal(router_logits(x, w), got)


# -- int8 and int4 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cores", [False, True], ids=["dots", "cores"])
@pytest.mark.parametrize("N", [1, 5])
@pytest.mark.parametrize("D,O", [(200, 70), (320, 960)], ids=lambda x: str(x))
def test_int8_rows_take_the_same_kernel(N, D, O, cores):
    from kimi_desk.kernels.quant import quantize_int8_rows

    gen = torch.Generator().manual_seed(D + N)
    q, scale = quantize_int8_rows(torch.randn(O, D, generator=gen))
    x = torch.randn(N, D, generator=gen).to(torch.bfloat16)
    got = row_scaled_gemv(x, q, scale, config={"cores": cores})
    assert rel_err(got, reference_f64(x, q, scale)) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N", [1, 16])
@pytest.mark.parametrize("D,O,group", [(256, 70, 128), (320, 960, 64), (1120, 24, 32)], ids=lambda x: str(x))
def test_int4_gemv_matches_float64(dtype, N, D, O, group):
    """int4 groups of 128, 64 and 32 inputs; O not a multiple of the row block, splits of the width
    cutting through groups (1120 = 35 groups of 32 in 9 splits)."""
    from kimi_desk.kernels.quant import dequantize_int4_groups, int4_linear, quantize_int4_groups
    from kimi_desk.kernels.quant.gemv import int4_gemv

    gen = torch.Generator().manual_seed(N + D + O)
    w = torch.randn(O, D, generator=gen) * torch.logspace(-2, 2, O)[torch.randperm(O, generator=gen), None]
    packed, scale, zero = quantize_int4_groups(w, group)
    x = torch.randn(N, D, generator=gen).to(dtype)
    want = x.double() @ dequantize_int4_groups(packed, scale, zero, torch.float64).T
    got = int4_gemv(x, packed, scale, zero)
    assert got.dtype == dtype and got.shape == (N, O)
    assert rel_err(got, want) < {torch.float32: 2e-3, torch.bfloat16: 4e-3}[dtype]
    assert rel_err(int4_linear(x, packed, scale, zero), want) < 1e-2  # the dispatch (CPU: PyTorch)
