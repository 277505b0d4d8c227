"""PyTorch's weight-only int4 and int8 operators on the CPU (kernels/quant/cpu.py) against float64 on the
dequantized weights; the int4 matrices include heights that are not multiples of the operator's 16."""

import pytest
import torch
from cpu_tiles import pack_tiles

from kimi_desk.kernels.quant import (
    dequantize_int4_groups,
    dequantize_rows,
    quantize_int4_groups,
    quantize_int8_rows,
    row_scaled_linear,
)
from kimi_desk.kernels.quant.cpu import (
    CPU_INT4_LAYOUTS,
    codes_to_tiles,
    cpu_int4_fits,
    cpu_int4_layout,
    cpu_int8_fits,
    int4_expert_cpu,
    int4_linear_cpu,
    int8_linear_cpu,
    pack_int4_expert_for_cpu,
    pack_int4_for_cpu,
    tiles_to_codes,
    tiles_to_scales,
)
from kimi_desk.kernels.quant.naive import unpack_int4

# The operators take bf16 (int4) or x's dtype (int8) rows, sum in float32 and round the output once; the
# int8 operator also rounds each row's scale to x's dtype.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(a, b):
    assert not torch.isnan(a).any()
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("O,D,rows", [(48, 64, 1), (1093, 320, 3), (40, 96, 17)], ids=lambda x: str(x))
def test_int4_operator_matches_float64(O, D, rows):
    if not cpu_int4_fits(O, D):
        pytest.skip("this PyTorch has no CPU int4 operator")
    gen = torch.Generator().manual_seed(O + rows)
    codes, scale, zero = quantize_int4_groups(torch.randn(O, D, generator=gen))
    x = torch.randn(2, rows, D, generator=gen).bfloat16()
    want = x.double() @ dequantize_int4_groups(codes, scale, zero, torch.float64).t()
    got = int4_linear_cpu(x, pack_int4_for_cpu(codes, scale, zero))
    assert got.shape == (2, rows, O) and got.dtype == torch.bfloat16
    assert rel_err(got, want) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("O,D,rows", [(48, 64, 1), (1093, 320, 3), (40, 96, 16)], ids=lambda x: str(x))
def test_int8_operator_matches_float64(dtype, O, D, rows):
    gen = torch.Generator().manual_seed(O * 3 + rows)
    q, s = quantize_int8_rows(torch.randn(O, D, generator=gen))
    x = torch.randn(1, rows, D, generator=gen).to(dtype)
    if not cpu_int8_fits(x, q):
        pytest.skip("this PyTorch has no CPU int8 operator")
    want = x.double() @ dequantize_rows(q, s, torch.float64).t()
    got = int8_linear_cpu(x, q, s)
    assert got.shape == (1, rows, O) and got.dtype == dtype
    # The operator multiplies in bf16 whatever x's dtype (its float32 form is several times slower).
    assert rel_err(got, want) < TOLERANCE[torch.bfloat16]
    # A few rows take the operator, more rows the dequantized weight: the same function either way.
    assert rel_err(row_scaled_linear(x, q, s), want) < TOLERANCE[torch.bfloat16]
    many = torch.randn(40, D, generator=gen).to(dtype)
    assert (
        rel_err(row_scaled_linear(many, q, s), many.double() @ dequantize_rows(q, s, torch.float64).t())
        < TOLERANCE[dtype]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_many_rows_on_a_weight_dequantized_in_blocks_match_float64(monkeypatch, dtype):
    """Many rows on the CPU: the int8 weight dequantized and multiplied a block of rows at a time (blocks
    of 64 rows here, the last one short) is the product on the whole weight."""
    import kimi_desk.kernels.quant as quant

    if not quant.avx2.int8_dequantizes(torch.zeros(1, 1, dtype=torch.int8), torch.ones(1), dtype):
        pytest.skip("no AVX2 kernels on this machine")
    gen = torch.Generator().manual_seed(17)
    O, D = 300, 128
    q, s = quantize_int8_rows(torch.randn(O, D, generator=gen))
    x = torch.randn(2, 40, D, generator=gen).to(dtype)
    monkeypatch.setattr(quant, "DEQUANTIZED_BLOCK_BYTES", 64 * D * x.element_size())
    calls = []
    dequantize = quant.avx2.int8_dequantize_rows
    monkeypatch.setattr(quant.avx2, "int8_dequantize_rows", lambda *a: calls.append(a[0].shape[0]) or dequantize(*a))
    got = row_scaled_linear(x, q, s)
    assert calls == [64, 64, 64, 64, 44] and got.shape == (2, 40, O) and got.dtype == dtype
    assert rel_err(got, x.double() @ dequantize_rows(q, s, torch.float64).t()) < TOLERANCE[dtype]


@pytest.mark.parametrize("hidden,rows", [(128, 1), (64, 5)], ids=lambda x: str(x))
def test_int4_expert_with_w1_and_w3_joined_matches_float64(hidden, rows):
    """The expert's two products (w1 and w3 as one matrix) against float64 on the dequantized weights;
    the joined matrix's first half is w1's own packing, byte for byte (what streaming relies on)."""
    D = 96
    if not cpu_int4_fits(2 * hidden, D):
        pytest.skip("this PyTorch has no CPU int4 operator")
    gen = torch.Generator().manual_seed(hidden + rows)
    w1, w2, w3 = (
        quantize_int4_groups(torch.randn(*shape, generator=gen)) for shape in ((hidden, D), (D, hidden), (hidden, D))
    )
    x = torch.randn(rows, D, generator=gen).bfloat16()
    f1, f2, f3 = (dequantize_int4_groups(*w, torch.float64) for w in (w1, w2, w3))
    xd = x.double()
    want = (torch.nn.functional.silu(xd @ f1.t()) * (xd @ f3.t())) @ f2.t()
    expert = pack_int4_expert_for_cpu(w1, w2, w3)
    assert rel_err(int4_expert_cpu(x, expert), want) < 2e-2
    half = expert.gate_up.packed.shape[0] // 2
    assert torch.equal(expert.gate_up.packed[:half], pack_int4_for_cpu(*w1).packed)


def test_tiles_turn_back_into_our_layout_exactly():
    gen = torch.Generator().manual_seed(0)
    for out_features, in_features in [(64, 128), (128, 64), (192, 256)]:
        stack = []
        for _ in range(3):
            w = torch.randn(out_features, in_features, generator=gen)
            packed, scale, zero = quantize_int4_groups(w)
            stack.append((packed, scale, zero, pack_int4_for_cpu(packed, scale, zero)))
        tiles = torch.stack([s[3].packed for s in stack])
        assert torch.equal(tiles_to_codes(tiles, out_features), torch.stack([s[0] for s in stack]))
        scale, zero = tiles_to_scales(torch.stack([s[3].scales_and_zeros for s in stack]))
        assert torch.equal(scale, torch.stack([s[1] for s in stack]).to(scale.dtype))
        assert torch.equal(zero, torch.stack([s[2] for s in stack]).to(zero.dtype))


def test_this_machines_tile_layout_is_found_and_reproduces_the_packing():
    if not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
        pytest.skip("this PyTorch has no CPU int4 operator")
    layout = cpu_int4_layout()
    assert layout in CPU_INT4_LAYOUTS
    codes = torch.randint(0, 16, (192, 96), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    tiles = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)  # 192 rows: whole blocks of any layout
    assert torch.equal(tiles, pack_tiles(codes, layout))


@pytest.mark.parametrize(
    "layout", CPU_INT4_LAYOUTS, ids=lambda layout: f"{layout.rows}-{'split' if layout.split else 'pairs'}"
)
def test_tiles_of_every_known_layout_turn_back_into_our_layout(layout):
    gen = torch.Generator().manual_seed(layout.rows)
    packed = torch.randint(0, 256, (2, 128, 48), generator=gen, dtype=torch.uint8)  # ours: [S, O, D / 2]
    tiles = pack_tiles(unpack_int4(packed).to(torch.int32), layout)
    assert torch.equal(tiles_to_codes(tiles, 128, layout), packed)


@pytest.mark.parametrize(
    "layout", CPU_INT4_LAYOUTS, ids=lambda layout: f"{layout.rows}-{'split' if layout.split else 'pairs'}"
)
def test_our_codes_become_tiles_of_every_known_layout(layout):
    """codes_to_tiles rearranges bytes without the operator: the tiles the layout's description gives."""
    packed = torch.randint(0, 256, (192, 40), generator=torch.Generator().manual_seed(layout.rows), dtype=torch.uint8)
    assert torch.equal(codes_to_tiles(packed, layout), pack_tiles(unpack_int4(packed).to(torch.int32), layout))


@pytest.mark.parametrize("O", [16, 48, 64, 112, 208, 1024])
def test_our_codes_become_the_operators_tiles(O):
    """On this machine's layout, every height the operator takes (a multiple of 16): whole blocks here, the
    rows after them through the operator, together equal to the operator's conversion of the whole."""
    if not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
        pytest.skip("this PyTorch has no CPU int4 operator")
    packed = torch.randint(0, 256, (O, 48), generator=torch.Generator().manual_seed(O), dtype=torch.uint8)
    want = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(packed).to(torch.int32).contiguous(), 2)
    assert torch.equal(codes_to_tiles(packed), want)
