"""Joined projections (engine/fuse.py) against the separate ones: the same numbers, prefill and decode,
full precision and fp8, and on the Triton decode path (interpreter); nothing held twice, never saved."""

import pytest
import torch

from kimi_desk.engine import load_model
from kimi_desk.engine.fuse import BlockDiagonalLinear, FusedLinear, fuse_projections
from kimi_desk.engine.model import SparseMoE
from kimi_desk.engine.weights import save_checkpoint


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run(model, ids, split=50):
    """Logits of a prefill of `split` tokens, then the rest one token at a time."""
    state = model.new_state(ids.shape[0])
    parts = [model(ids[:, :split], state)] + [model(ids[:, t : t + 1], state) for t in range(split, ids.shape[1])]
    return torch.cat(parts, 1)


@pytest.mark.parametrize("quantize", [None, "fp8"])
@pytest.mark.parametrize("checkpoint_fixture", ["tiny_checkpoint", "tail7_checkpoint"])
def test_fused_model_computes_what_the_separate_projections_do(checkpoint_fixture, quantize, request):
    checkpoint = request.getfixturevalue(checkpoint_fixture)
    separate = load_model(checkpoint, dtype=torch.float32, quantize=quantize)
    fused = fuse_projections(load_model(checkpoint, dtype=torch.float32, quantize=quantize))
    ids = torch.randint(0, separate.config.vocab_size, (2, 64))
    assert rel_err(run(fused, ids), run(separate, ids)) < 1e-6

    # One joined projection per attention block and dense MLP; the shared experts folded into the routed.
    config = fused.config
    groups = [m for m in fused.modules() if isinstance(m, FusedLinear)]
    assert len(groups) == config.num_hidden_layers + config.first_k_dense_replace
    moes = [m for m in fused.modules() if isinstance(m, SparseMoE)]
    assert moes and all(m.shared_experts is None and m.gate.shared_expert == config.num_experts for m in moes)
    assert all(m.experts.w1.shape[0] == m.experts.w2.shape[0] == config.num_experts + 1 for m in moes)
    names = [name for name, _ in fused.named_parameters()]
    assert not any(
        name.endswith((".q_proj.weight", ".k_proj.weight", ".gate_proj.weight", ".b_proj.weight")) for name in names
    )
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    # The same parameters, plus the zero blocks of the KDA gates' block-diagonal product.
    diagonals = [m for m in fused.modules() if isinstance(m, BlockDiagonalLinear)]
    assert len(diagonals) == config.layer_kinds.count("kda")
    zeros = sum(m.inner.weight.numel() - sum(o * i for o, i in zip(m.sizes, m.widths)) for m in diagonals)
    assert count(fused) == count(separate) + zeros


def test_fused_decode_on_the_triton_path(tiny_checkpoint, monkeypatch):
    """The fused KDA decode (short conv and recurrence kernels, under the interpreter) reads the joined
    projection's views as it read the separate outputs."""
    monkeypatch.setenv("KIMI_DESK_KERNELS", "triton")
    monkeypatch.setenv("KIMI_DESK_CUDA_GRAPH", "0")
    separate = load_model(tiny_checkpoint, dtype=torch.float32)
    fused = fuse_projections(load_model(tiny_checkpoint, dtype=torch.float32))
    ids = torch.randint(0, separate.config.vocab_size, (1, 24))
    assert rel_err(run(fused, ids, split=20), run(separate, ids, split=20)) < 1e-5


def test_a_fused_model_is_not_saved(tiny_checkpoint, tmp_path):
    model = fuse_projections(load_model(tiny_checkpoint, dtype=torch.float32))
    with pytest.raises(ValueError, match="fused projections is not saved"):
        save_checkpoint(model, tmp_path / "out")
