"""Streamed experts on the CPU operator's int4 tiles (kernels/moe/streamed.py), the Triton kernel under
the interpreter and the PyTorch form, against float64 on the experts dequantized from kernels/quant's
own layout (the format the tiles were packed from): the pairs read the stack rows they name, in any
order, a pair of row -1 adds nothing and a row no pair names is not read, whatever their bytes hold;
tiles in every layout PyTorch is known to pack in (it depends on the CPU), not only this machine's. The
gather that fills the GPU's bank of slots copies the rows it names and leaves the other slots. TRITON_INTERPRET is set by tests/conftest.py, and here for a lone run of this file."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")
from cpu_tiles import pack_tiles  # noqa: E402

from kimi_desk.kernels.moe.naive import gather_rows_torch, streamed_experts_torch  # noqa: E402
from kimi_desk.kernels.moe.streamed import gather_rows_triton, streamed_experts_triton  # noqa: E402
from kimi_desk.kernels.quant import dequantize_int4_groups, quantize_int4_groups  # noqa: E402
from kimi_desk.kernels.quant.cpu import (  # noqa: E402
    CPU_INT4_LAYOUTS,
    cpu_int4_fits,
    cpu_int4_layout,
    pack_int4_expert_for_cpu,
    tiles_to_codes,
)
from kimi_desk.kernels.quant.naive import unpack_int4  # noqa: E402


def in_layout(tiles, layout):
    """Tiles packed by this machine's PyTorch, re-packed in `layout`."""
    return pack_tiles(unpack_int4(tiles_to_codes(tiles, tiles.shape[-2])).to(torch.int32), layout)


def slot_experts(S, D, I, group, gen):
    """S experts quantized to int4, as (float64 w1, w2, w3 of their grid, gate_up, down stacked tiles)."""
    dense, packed = [], []
    for _ in range(S):
        mats = [
            quantize_int4_groups(torch.randn(*shape, generator=gen) * 0.05, group) for shape in ((I, D), (D, I), (I, D))
        ]
        dense.append([dequantize_int4_groups(*m, torch.float32).double() for m in mats])
        packed.append(pack_int4_expert_for_cpu(*mats))
    gate_up = (
        torch.stack([p.gate_up.packed for p in packed]),
        torch.stack([p.gate_up.scales_and_zeros for p in packed]),
    )
    down = (torch.stack([p.down.packed for p in packed]), torch.stack([p.down.scales_and_zeros for p in packed]))
    return dense, gate_up, down


def layout_name(layout):
    return "native" if layout is None else f"{layout.rows}-{'split' if layout.split else 'pairs'}"


@pytest.mark.parametrize(
    "S,D,I,group,layout",
    [(3, 128, 64, 32, None), (4, 256, 128, 64, None), (2, 384, 192, 64, None), (2, 256, 128, 128, None)]
    + [(3, 128, 64, 32, layout) for layout in CPU_INT4_LAYOUTS],
    ids=lambda v: layout_name(v) if v is None or isinstance(v, tuple) else str(v),
)
@pytest.mark.parametrize("form", ["triton", "torch"])
def test_streamed_experts_match_float64(S, D, I, group, layout, form):
    if not cpu_int4_fits(2 * I, D):
        pytest.skip("this PyTorch has no CPU int4 operator")
    gen = torch.Generator().manual_seed(S * D + I)
    dense, gate_up, down = slot_experts(S, D, I, group, gen)
    if layout is not None and layout != cpu_int4_layout():
        gate_up, down = (in_layout(gate_up[0], layout), gate_up[1]), (in_layout(down[0], layout), down[1])
    x = torch.randn(1, D, generator=gen).bfloat16()
    # The pairs name the stack's rows backwards, then a pair of row -1; row 1 is named by none.
    rows = torch.tensor([r for r in reversed(range(S)) if r != 1] + [-1])
    weights = torch.rand(len(rows), generator=gen)
    gate_up[0][1].fill_(0xFF)  # what no pair names must not count, whatever its bytes
    expected = sum(
        w.item() * (F.silu(w1 @ x[0].double()) * (w3 @ x[0].double())) @ w2.T
        for w, r in zip(weights, rows.tolist())
        if r >= 0
        for w1, w2, w3 in [dense[r]]
    )
    forward = streamed_experts_triton if form == "triton" else streamed_experts_torch
    got = forward(x, gate_up, down, rows, weights, layout=layout)
    assert got.shape == (1, D) and got.dtype == torch.float32
    err = ((got[0].double() - expected).norm() / expected.norm()).item()
    assert err < 1e-5, err


@pytest.mark.parametrize("form", ["triton", "torch"])
def test_pairs_whose_rows_a_bank_holds_read_the_bank(form):
    """A bank's slot holding a stack row stands in for it: the same sum whether the experts are read from
    the bank or the stack, the pairs counted by where they were read."""
    if not cpu_int4_fits(128, 128):
        pytest.skip("this PyTorch has no CPU int4 operator")
    gen = torch.Generator().manual_seed(5)
    _, gate_up, down = slot_experts(4, 128, 64, 32, gen)
    held = torch.tensor([2, -1, 0, 2])
    # Slot 0 holds row 2, slot 2 row 0; slot 1 holds nothing (its bytes garbage); slot 3 claims row 2 as
    # well but holds garbage: the first slot holding a row is the one read. The stack's rows 0 and 2 are
    # spoiled: what the bank holds must be read from the bank.
    bank = tuple(
        (
            torch.stack([t[2], torch.full_like(t[0], 0x77), t[0], torch.full_like(t[0], 0x55)]),
            torch.stack([s[2], s[1], s[0], s[1]]),
        )
        for t, s in (gate_up, down)
    )
    x = torch.randn(1, 128, generator=gen).bfloat16()
    weights = torch.rand(4, generator=gen)
    rows = torch.tensor([2, 3, 0, -1])
    forward = streamed_experts_triton if form == "triton" else streamed_experts_torch
    want = forward(x, gate_up, down, rows, weights)
    spoiled = tuple((t.clone(), s) for t, s in (gate_up, down))
    for t, _ in spoiled:
        t[0].fill_(0x33), t[2].fill_(0x33)
    counts = torch.zeros(3, dtype=torch.int64)
    got = forward(x, *spoiled, rows, weights, (*bank, held), counts)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert counts.tolist() == [1, 0, 2]


@pytest.mark.parametrize("form", ["triton", "torch"])
def test_gather_rows_copies_the_named_rows_and_leaves_the_others(form):
    gen = torch.Generator().manual_seed(3)
    src = torch.randint(0, 256, (6, 5, 12), dtype=torch.uint8, generator=gen)
    dst = torch.zeros(4, 5, 12, dtype=torch.uint8)
    rows = torch.tensor([4, -1, 0, 4])
    (gather_rows_triton if form == "triton" else gather_rows_torch)(src, rows, dst)
    assert torch.equal(dst[0], src[4]) and torch.equal(dst[2], src[0]) and torch.equal(dst[3], src[4])
    assert not dst[1].any()


@pytest.mark.parametrize("form", ["triton", "torch"])
def test_several_tokens_each_take_their_own_pairs(form):
    """x [N, D] with rows [N, K]: each token's sum is the one of its own pairs, as if computed alone."""
    if not cpu_int4_fits(128, 128):
        pytest.skip("this PyTorch has no CPU int4 operator")
    gen = torch.Generator().manual_seed(9)
    _, gate_up, down = slot_experts(5, 128, 64, 32, gen)
    x = torch.randn(3, 128, generator=gen).bfloat16()
    rows = torch.tensor([[4, 0, -1], [1, 1, 3], [-1, -1, 2]])
    weights = torch.rand(3, 3, generator=gen)
    forward = streamed_experts_triton if form == "triton" else streamed_experts_torch
    got = forward(x, gate_up, down, rows, weights)
    assert got.shape == (3, 128)
    for n in range(3):
        alone = forward(x[n : n + 1], gate_up, down, rows[n], weights[n])
        assert torch.allclose(got[n], alone[0], rtol=1e-5, atol=1e-6)
