"""Our AVX2 int4 and int8 kernels (kernels/quant/avx2.py, avx2.c) against float64 on the dequantized weights,
on fresh random inputs, in every tile layout they read (packed by cpu_tiles.py, independently of PyTorch)
and every group size; and where they are used."""

import platform
import shutil

import pytest
import torch
from cpu_tiles import pack_tiles

from kimi_desk.kernels.quant import (
    avx2,
    dequantize_int4_groups,
    dequantize_rows,
    quantize_int4_groups,
    quantize_int8_rows,
)
from kimi_desk.kernels.quant.cpu import (
    CpuInt4Layout,
    cpu_int4_layout,
    int4_experts_stacked,
    int4_linear_cpu,
    int8_linear_cpu,
    pack_int4_expert_for_cpu,
    pack_int4_for_cpu,
    stack_int4_experts_for_cpu,
)
from kimi_desk.kernels.quant.naive import dequantize_rows_torch, unpack_int4

# The activations are rounded to int8 in blocks of 32 (~0.5% of a random product); the weights are exact.
TOLERANCE = 1.5e-2


def rel_err(a, b):
    assert not torch.isnan(a).any()
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def can_build() -> bool:
    return (
        platform.machine().lower() in ("x86_64", "amd64")
        and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
        and any(shutil.which(c) for c in ("cc", "gcc"))
    )


def test_kernels_build_where_they_can():
    """A machine with AVX2 and a C compiler (CI's) must get the kernels, never the slow path silently."""
    if not can_build():
        assert avx2.library() is None and "PyTorch's operator" in avx2.quantized_backend()
        return
    assert avx2.library() is not None, avx2.quantized_backend()
    assert "AVX2 kernels" in avx2.quantized_backend()


def scales_and_zeros(scale, zero):
    return torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # [G, O, 2] bf16


@pytest.mark.parametrize("rows_per_tile", [32, 64])
@pytest.mark.parametrize(
    "O,D,group,M", [(64, 128, 32, 1), (128, 320, 64, 3), (192, 256, 128, 40), (64, 640, 128, 1), (64, 256, 32, 131)]
)
def test_linear_matches_float64(rows_per_tile, O, D, group, M):
    if avx2.library() is None:
        pytest.skip(avx2.quantized_backend())
    if O % rows_per_tile:
        pytest.skip("whole tiles only")
    gen = torch.Generator().manual_seed(O + D + M + rows_per_tile)
    codes, scale, zero = quantize_int4_groups(torch.randn(O, D, generator=gen), group)
    tiles = pack_tiles(unpack_int4(codes).to(torch.uint8), CpuInt4Layout(rows_per_tile, True))
    x = torch.randn(M, D, generator=gen) * torch.rand(1, D, generator=gen) * 4  # uneven channels
    want = x.double() @ dequantize_int4_groups(codes, scale, zero, torch.float64).t()
    got = avx2.int4_linear_avx2(x, tiles, scales_and_zeros(scale, zero), rows_per_tile, group)
    assert got.shape == (M, O) and got.dtype == torch.float32
    assert rel_err(got, want) < TOLERANCE


@pytest.mark.parametrize("rows_per_tile", [32, 64])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_avx512_products_give_the_avx2_bits(rows_per_tile, group):
    """Where the CPU has AVX-512 VNNI, int4 products take it: the same bits as the AVX2 form for one row
    and a few (the one-row path) and for every count of rows left over by the many-rows path's blocks of
    6, in products and in the experts of one token and of many."""
    lib = avx2.library()
    if lib is None or not lib.use_avx512_products(1):
        pytest.skip("this CPU has no AVX-512 VNNI")
    gen = torch.Generator().manual_seed(rows_per_tile + group)
    O, D = 2 * rows_per_tile, 256
    codes, scale, zero = quantize_int4_groups(torch.randn(O, D, generator=gen), group)
    tiles = pack_tiles(unpack_int4(codes).to(torch.uint8), CpuInt4Layout(rows_per_tile, True))
    sz = scales_and_zeros(scale, zero)
    try:
        for M in (1, 2, 5, 6, 7, 8, 9, 10, 11, 12, 70):
            x = torch.randn(M, D, generator=gen)
            lib.use_avx512_products(1)
            wide = avx2.int4_linear_avx2(x, tiles, sz, rows_per_tile, group)
            lib.use_avx512_products(0)
            assert torch.equal(wide, avx2.int4_linear_avx2(x, tiles, sz, rows_per_tile, group)), M
        layout = cpu_int4_layout()
        if layout is not None and group == 64 and rows_per_tile == layout.rows:
            mats = [
                [
                    quantize_int4_groups(torch.randn(o, i, generator=gen) * 0.1, group)
                    for o, i in ((O, D), (D, O), (O, D))
                ]
                for _ in range(3)
            ]
            stacks, _ = stack_int4_experts_for_cpu((pack_int4_expert_for_cpu(*m) for m in mats), 3)
            for tokens in (1, 40):
                x = torch.randn(tokens, D, generator=gen)
                ids = torch.randint(0 if tokens == 1 else -1, 3, (tokens, 2), generator=gen)
                weights = torch.rand(tokens, 2, generator=gen)
                lib.use_avx512_products(1)
                wide = int4_experts_stacked(x, ids, weights, stacks)
                lib.use_avx512_products(0)
                assert torch.equal(wide, int4_experts_stacked(x, ids, weights, stacks)), tokens
    finally:
        lib.use_avx512_products(1)


@pytest.mark.parametrize("M", [1, 7])
def test_bfloat16_in_and_out_as_float32_rounded_once(M):
    """bfloat16 activations are read as the float32 they widen to, exactly; a bfloat16 result is the
    float32 one rounded as PyTorch rounds; out_features drops the tiles' padding rows. For the linear,
    the int4 experts and the int8 rows."""
    layout = cpu_int4_layout()
    if avx2.library() is None or layout is None:
        pytest.skip(avx2.quantized_backend())
    gen = torch.Generator().manual_seed(M)
    O, D = 2 * layout.rows, 256
    codes, scale, zero = quantize_int4_groups(torch.randn(O, D, generator=gen), 64)
    tiles = pack_tiles(unpack_int4(codes).to(torch.uint8), layout)
    sz = scales_and_zeros(scale, zero)
    x = (torch.randn(M, D, generator=gen) * 3).bfloat16()
    full = avx2.int4_linear_avx2(x.float(), tiles, sz, layout.rows, 64)
    assert torch.equal(avx2.int4_linear_avx2(x, tiles, sz, layout.rows, 64, out_dtype=torch.float32), full)
    got = avx2.int4_linear_avx2(x, tiles, sz, layout.rows, 64, O - 5)
    assert got.dtype == torch.bfloat16 and torch.equal(got, full[:, : O - 5].bfloat16())

    E, hidden = 3, 2 * layout.rows
    mats = [
        [
            quantize_int4_groups(torch.randn(o, i, generator=gen) * 0.1, 32)
            for o, i in ((hidden, D), (D, hidden), (hidden, D))
        ]
        for _ in range(E)
    ]
    stacks, _ = stack_int4_experts_for_cpu((pack_int4_expert_for_cpu(*m) for m in mats), E)
    rows, weights = torch.tensor([2, 0]), torch.rand(2, generator=gen)
    want = int4_experts_stacked(x[:1].float(), rows[None], weights[None], stacks)
    assert torch.equal(int4_experts_stacked(x[:1], rows[None], weights[None], stacks), want)
    assert torch.equal(int4_experts_stacked(x[:1], rows[None], weights[None], stacks, torch.bfloat16), want.bfloat16())

    q, row_scale = quantize_int8_rows(torch.randn(64, D, generator=gen))
    want = avx2.int8_linear_avx2(x.float(), q, row_scale)
    got = avx2.int8_linear_avx2(x, q, row_scale)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want.bfloat16())


def test_zero_rows_and_zero_activations():
    """A block of activations all zero (scale 0) and a row of zero weights give exact zeros, not NaN."""
    if avx2.library() is None:
        pytest.skip(avx2.quantized_backend())
    codes, scale, zero = quantize_int4_groups(torch.randn(32, 64))
    scale[3], zero[3] = 0, 0
    x = torch.randn(2, 64)
    x[1] = 0
    x[0, :32] = 0
    tiles = pack_tiles(unpack_int4(codes).to(torch.uint8), CpuInt4Layout(32, True))
    got = avx2.int4_linear_avx2(x, tiles, scales_and_zeros(scale, zero), 32, 64)
    want = x.double() @ dequantize_int4_groups(codes, scale, zero, torch.float64).t()
    assert torch.equal(got[1], torch.zeros(32)) and got[0, 3] == 0
    assert rel_err(got, want) < TOLERANCE


def test_int4_linear_cpu_takes_the_kernels_at_any_height(monkeypatch):
    """int4_linear_cpu goes through the kernels for matrices of any height (packing pads them to whole
    tiles) and float32 or bfloat16 rows, through PyTorch's operator for other rows (float16); both agree
    with float64."""
    layout = cpu_int4_layout()
    if avx2.library() is None or layout is None:
        pytest.skip(avx2.quantized_backend())
    calls = []
    real = avx2.int4_linear_avx2
    monkeypatch.setattr(avx2, "int4_linear_avx2", lambda *a: calls.append(a) or real(*a))
    gen = torch.Generator().manual_seed(7)
    for O, dtype, uses_kernels in (
        (2 * layout.rows, torch.bfloat16, True),
        (layout.rows + 16, torch.bfloat16, True),
        (37, torch.float32, True),
        (layout.rows + 16, torch.float16, False),
    ):
        codes, scale, zero = quantize_int4_groups(torch.randn(O, 256, generator=gen))
        x = torch.randn(3, 256, generator=gen).to(dtype)
        want = x.double() @ dequantize_int4_groups(codes, scale, zero, torch.float64).t()
        calls.clear()
        got = int4_linear_cpu(x, pack_int4_for_cpu(codes, scale, zero))
        assert bool(calls) == uses_kernels
        assert got.shape == (3, O) and got.dtype == dtype and rel_err(got, want) < TOLERANCE


@pytest.mark.parametrize("group,extra", [(32, 0), (128, 0), (32, 32)], ids=["g32", "g128", "w1-ends-mid-tile"])
def test_experts_one_token_match_float64(group, extra):
    """One token through several stacked experts in one call: each chosen expert's w2 (silu(w1 x) * w3 x),
    mixed by its weight, rows < 0 left out, an expert chosen twice counted twice; against float64 on the
    dequantized weights (the hidden activations are rounded to int8 too, so twice the tolerance)."""
    layout = cpu_int4_layout()
    if avx2.library() is None or layout is None:
        pytest.skip(avx2.quantized_backend())
    gen = torch.Generator().manual_seed(group)
    # extra = 32: w1 ends inside a tile where tiles have 64 rows (the demo model's 160 on AVX-512).
    E, D, hidden = 6, 256, (4 if not extra else 2) * layout.rows + extra
    mats = [
        [
            quantize_int4_groups(torch.randn(o, i, generator=gen) * 0.1, group)
            for o, i in ((hidden, D), (D, hidden), (hidden, D))
        ]
        for _ in range(E)
    ]
    stacks, _ = stack_int4_experts_for_cpu((pack_int4_expert_for_cpu(*m) for m in mats), E)
    x = torch.randn(1, D, generator=gen)
    rows = torch.tensor([4, -1, 0, 2, 4, 5])
    weights = torch.rand(6, generator=gen)
    want = torch.zeros(1, D, dtype=torch.float64)
    for e, w in zip(rows.tolist(), weights.tolist()):
        if e >= 0:
            w1, w2, w3 = (dequantize_int4_groups(*m, torch.float64) for m in mats[e])
            xd = x.double()
            want += w * (torch.nn.functional.silu(xd @ w1.t()) * (xd @ w3.t())) @ w2.t()
    got = int4_experts_stacked(x, rows[None], weights[None], stacks)
    assert got.shape == (1, D) and got.dtype == torch.float32
    assert rel_err(got, want) < 2 * TOLERANCE
    none_chosen = int4_experts_stacked(x, torch.tensor([[-1, -1]]), torch.ones(1, 2), stacks)
    assert torch.equal(none_chosen, torch.zeros(1, D))
    none_of_two = int4_experts_stacked(x.expand(2, D), torch.full((2, 2), -1), torch.ones(2, 2), stacks)
    assert torch.equal(none_of_two, torch.zeros(2, D))


@pytest.mark.parametrize("N,k,extra", [(7, 3, 0), (450, 3, 0), (7, 3, 32)])  # 1,350 choices: two rounds
def test_experts_of_many_tokens_match_float64(N, k, extra):
    """Many tokens through their chosen stacked experts in one call (grouped by expert): each token's
    mix of its experts against float64 on the dequantized weights, choices < 0 left out, an expert chosen
    by many tokens; bf16 in and out as the float32 call rounded once; the same sums on 1 thread as on 2."""
    layout = cpu_int4_layout()
    if avx2.library() is None or layout is None:
        pytest.skip(avx2.quantized_backend())
    gen = torch.Generator().manual_seed(N + extra)
    E, D, hidden = 5, 256, 2 * layout.rows + extra  # extra = 32: w1 ends inside a tile of 64 rows
    mats = [
        [
            quantize_int4_groups(torch.randn(o, i, generator=gen) * 0.1, 32 if extra else 64)
            for o, i in ((hidden, D), (D, hidden), (hidden, D))
        ]
        for _ in range(E)
    ]
    stacks, _ = stack_int4_experts_for_cpu((pack_int4_expert_for_cpu(*m) for m in mats), E)
    x = torch.randn(N, D, generator=gen)
    ids = torch.randint(-1, E, (N, k), generator=gen)
    ids[:, 0] = 2  # one expert chosen by every token
    weights = torch.rand(N, k, generator=gen)
    dense = [[dequantize_int4_groups(*m, torch.float64) for m in mats[e]] for e in range(E)]
    want = torch.zeros(N, D, dtype=torch.float64)
    for n in range(N):
        for e, w in zip(ids[n].tolist(), weights[n].tolist()):
            if e >= 0:
                w1, w2, w3 = dense[e]
                xd = x[n].double()
                want[n] += w * (torch.nn.functional.silu(w1 @ xd) * (w3 @ xd)) @ w2.t()
    got = int4_experts_stacked(x, ids, weights, stacks)
    assert got.shape == (N, D) and got.dtype == torch.float32
    assert rel_err(got, want) < 2 * TOLERANCE
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(int4_experts_stacked(x, ids, weights, stacks), got)
    finally:
        torch.set_num_threads(threads)
    half = x.bfloat16()
    widened = int4_experts_stacked(half.float(), ids, weights, stacks)
    assert torch.equal(int4_experts_stacked(half, ids, weights, stacks, torch.bfloat16), widened.bfloat16())


@pytest.mark.parametrize("O,D,M", [(4, 256, 1), (64, 320, 3), (1028, 256, 16), (773, 320, 1), (3, 64, 2)])
def test_int8_rows_match_float64(O, D, M):
    """int8 codes with a scale per row, as stored, times a few rows rounded to int8 in blocks of 32
    (codes at both ends of the range included: -128 has no positive twin, the sign trick must hold)."""
    if avx2.library() is None:
        pytest.skip(avx2.quantized_backend())
    gen = torch.Generator().manual_seed(O + D + M)
    q = torch.randint(-128, 128, (O, D), generator=gen, dtype=torch.int8)
    q[0, :4] = torch.tensor([-128, 127, 0, -1], dtype=torch.int8)
    scale = torch.rand(O, generator=gen) * 0.01
    x = torch.randn(M, D, generator=gen) * torch.rand(1, D, generator=gen) * 4
    want = x.double() @ (q.double() * scale.double()[:, None]).t()
    got = avx2.int8_linear_avx2(x, q, scale)
    assert got.shape == (M, O) and got.dtype == torch.float32
    assert rel_err(got, want) < TOLERANCE


def test_int8_avx512_gives_the_avx2_bits():
    """Where the CPU has AVX-512 VNNI, int8 rows take it, two blocks of 32 inputs a step and the odd block
    alone: the same bits as the AVX2 form, codes -128 and 127 included, in products of a few rows and in
    one token's experts."""
    lib = avx2.library()
    if lib is None or not lib.use_avx512_products(1):
        pytest.skip("this CPU has no AVX-512 VNNI")
    gen = torch.Generator().manual_seed(8)
    try:
        for O, D, M in ((8, 32, 1), (12, 96, 2), (64, 256, 3), (36, 320, 5), (39, 64, 2)):
            q = torch.randint(-128, 128, (O, D), generator=gen, dtype=torch.int8)
            q[0, :4] = torch.tensor([-128, 127, -128, -1], dtype=torch.int8)
            scale = torch.rand(O, generator=gen) * 0.01
            x = torch.randn(M, D, generator=gen)
            lib.use_avx512_products(1)
            wide = avx2.int8_linear_avx2(x, q, scale)
            lib.use_avx512_products(0)
            assert torch.equal(wide, avx2.int8_linear_avx2(x, q, scale)), (O, D, M)
        E, D, hidden = 4, 96, 160
        w1, w3 = (torch.randint(-128, 128, (E, hidden, D), generator=gen, dtype=torch.int8) for _ in range(2))
        w2 = torch.randint(-128, 128, (E, D, hidden), generator=gen, dtype=torch.int8)
        s1, s3 = (torch.rand(E, hidden, generator=gen) * 0.01 for _ in range(2))
        s2 = torch.rand(E, D, generator=gen) * 0.01
        x, ids, weights = torch.randn(1, D, generator=gen), torch.tensor([2, -1, 0]), torch.rand(3, generator=gen)
        lib.use_avx512_products(1)
        wide = avx2.int8_experts_one_token(x, ids, weights, w1, w2, w3, s1, s2, s3)
        lib.use_avx512_products(0)
        assert torch.equal(wide, avx2.int8_experts_one_token(x, ids, weights, w1, w2, w3, s1, s2, s3))
    finally:
        lib.use_avx512_products(1)


def test_int8_linear_cpu_takes_the_kernel_where_it_reads(monkeypatch):
    """int8_linear_cpu goes through the kernel for inputs in 32s, any count of rows, and through PyTorch's
    operator otherwise; both agree with float64, in x's dtype."""
    if avx2.library() is None:
        pytest.skip(avx2.quantized_backend())
    calls = []
    real = avx2.int8_linear_avx2
    monkeypatch.setattr(avx2, "int8_linear_avx2", lambda *a: calls.append(a) or real(*a))
    gen = torch.Generator().manual_seed(11)
    for O, D, uses_kernel in ((64, 256, True), (66, 256, True), (64, 80, False)):
        q, scale = quantize_int8_rows(torch.randn(O, D, generator=gen))
        x = torch.randn(2, D, generator=gen).bfloat16()
        want = x.double() @ dequantize_rows(q, scale, torch.float64).t()
        calls.clear()
        got = int8_linear_cpu(x, q, scale)
        assert bool(calls) == uses_kernel
        assert got.dtype == torch.bfloat16 and rel_err(got, want) < TOLERANCE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_dequantized_rows_are_the_pytorch_forms_bit_for_bit(dtype):
    """The weight a many-row int8 product multiplies: each code times its row's scale in float32, rounded
    once to the dtype (ties to even), bit for bit as naive.py's dequantize_rows_torch gives it; widths
    that are not a multiple of 8 take the scalar tail; stacked experts [E, O, D] too."""
    if avx2.library() is None:
        pytest.skip(avx2.quantized_backend())
    gen = torch.Generator().manual_seed(3)
    for shape in ((37, 259), (4, 16, 64)):
        q = torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8)
        scale = torch.rand(shape[:-1], generator=gen) * 0.02
        scale.view(-1)[0] = 1 + 2.0**-8  # codes 1, 2, 4, ... then fall exactly between two bf16 values
        assert avx2.int8_dequantizes(q, scale, dtype)
        got = avx2.int8_dequantize_rows(q, scale, dtype)
        assert got.dtype == dtype and torch.equal(got, dequantize_rows_torch(q, scale, dtype))
    assert not avx2.int8_dequantizes(q.transpose(-1, -2), scale, dtype)
    assert not avx2.int8_dequantizes(q.float(), scale, dtype)
