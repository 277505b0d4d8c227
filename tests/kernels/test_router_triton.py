"""The MoE router kernel, run on CPU tensors through Triton's interpreter, against a float64 reference of
Router.forward's formula, and Router.forward itself with KIMI_DESK_KERNELS=triton against =torch.

The kernel returns ids in choice order and torch.topk(sorted=False) in none in particular, so ids are
compared as sorted sets and weights after sorting each row by id. TRITON_INTERPRET is set by
tests/conftest.py before anything imports Triton; it is set here too for a lone run of this file.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
from moe_cases import SCALING, assert_same_routing, routing_reference_f64  # noqa: E402

from kimi_desk.bench.random_checkpoint import tiny_config  # noqa: E402
from kimi_desk.engine.model import Router  # noqa: E402
from kimi_desk.kernels.moe import router as router_module  # noqa: E402
from kimi_desk.kernels.moe.router import route_topk_triton  # noqa: E402


def run_kernel(logits, bias, top_k, activation, renormalize, scaling, weights_from_biased, append=None):
    """route_topk_triton with its outputs poisoned beforehand, so an element it never wrote shows up:
    NaN weights, and ids of -1 (outside any set of experts)."""
    real_empty = torch.empty

    def poisoned_empty(*shape, dtype=None, device=None):
        out = real_empty(*shape, dtype=dtype, device=device)
        return out.fill_(float("nan") if out.is_floating_point() else -1)

    router_module.torch.empty = poisoned_empty
    try:
        return route_topk_triton(
            logits, bias, top_k, activation, renormalize, scaling, weights_from_biased, append=append
        )
    finally:
        router_module.torch.empty = real_empty


@pytest.mark.parametrize("weights_from_biased", [False, True], ids=["unbiased", "biased"])
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "raw"])
@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
@pytest.mark.parametrize(
    "N,E,top_k",
    [
        (1, 8, 1),
        (5, 8, 2),
        (16, 8, 8),
        (1, 256, 8),
        (5, 256, 2),
        (16, 256, 8),
        (5, 300, 8),
        (16, 300, 1),
        (1, 300, 2),
        (2, 3000, 8),
    ],
    ids=lambda x: str(x),
)
def test_kernel_matches_float64(N, E, top_k, activation, renormalize, weights_from_biased):
    """E of 256 (the 48B model), a power of two below it, 300 and 3000 (padded, masked); top_k = E at
    (16, 8, 8). A small correction bias, as trained ones are."""
    gen = torch.Generator().manual_seed(N * 1000 + E + top_k)
    logits = torch.randn(N, E, generator=gen) * 2
    bias = torch.randn(E, generator=gen) * 0.05
    args = (top_k, activation, renormalize, SCALING, weights_from_biased)
    assert_same_routing(*run_kernel(logits, bias, *args), *routing_reference_f64(logits, bias, *args))


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_bias_changes_the_choice(activation):
    """A large bias on a few experts makes them win over the largest scores: the ids follow the biased
    scores, and the default weights the unbiased ones."""
    N, E, top_k = 4, 256, 8
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(N, E, generator=gen)
    bias = torch.zeros(E)
    favoured = torch.tensor([3, 50, 77, 130, 199, 255])
    bias[favoured] = 10.0
    # The favoured experts get the lowest logits, so without the bias they would never be chosen.
    logits[:, favoured] = -5.0
    for weights_from_biased in (False, True):
        args = (top_k, activation, True, SCALING, weights_from_biased)
        ids, weights = run_kernel(logits, bias, *args)
        assert_same_routing(ids, weights, *routing_reference_f64(logits, bias, *args))
        unbiased_ids = routing_reference_f64(logits, torch.zeros(E), *args)[0]
        for row in range(N):
            assert set(favoured.tolist()) <= set(ids[row].tolist())
            assert not set(favoured.tolist()) & set(unbiased_ids[row].tolist())


def test_ties_go_to_the_lowest_id():
    """Equal scores everywhere: the lowest ids, with equal weights."""
    logits, bias = torch.zeros(3, 300), torch.zeros(300)
    ids, weights = run_kernel(logits, bias, 8, "sigmoid", True, SCALING, False)
    assert sorted(ids[0].tolist()) == list(range(8)) and torch.equal(ids[0], ids[2])
    torch.testing.assert_close(weights, torch.full((3, 8), SCALING / 8))


def test_nan_logits_still_give_ids_in_range():
    """A NaN logit ranks highest, as in torch.topk: its expert is chosen and the weights are NaN, but no id
    falls outside the experts (the expert kernels would read out of bounds)."""
    logits = torch.randn(2, 256)
    logits[0, 17] = float("nan")
    ids, weights = route_topk_triton(logits, torch.zeros(256), 8, "sigmoid", True, SCALING, False)
    assert 17 in ids[0].tolist() and ((ids >= 0) & (ids < 256)).all()
    assert torch.isnan(weights[0]).all() and not torch.isnan(weights[1]).any()


def make_router(seed, **overrides):
    router = Router(tiny_config(**overrides))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=gen) / router.weight.shape[1] ** 0.5)
        router.e_score_correction_bias.copy_(torch.randn(router.e_score_correction_bias.shape, generator=gen) * 0.1)
    return router


@pytest.mark.parametrize("hf_alias_weights", [False, True], ids=["unbiased", "biased"])
@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
@pytest.mark.parametrize("N", [1, 16, 17], ids=lambda n: f"N{n}")
def test_router_forward_triton_matches_torch(monkeypatch, N, activation, hf_alias_weights):
    """Router.forward through the kernel (KIMI_DESK_KERNELS=triton) and through PyTorch; N = 17 is past
    ROUTER_KERNEL_MAX_TOKENS and takes PyTorch either way."""
    router = make_router(seed=N, moe_router_activation_func=activation)
    router.hf_alias_weights = hf_alias_weights
    x = torch.randn(N, router.weight.shape[1], generator=torch.Generator().manual_seed(100 + N))
    with torch.no_grad():
        monkeypatch.setenv("KIMI_DESK_KERNELS", "torch")
        ref_ids, ref_weights = router(x)
        monkeypatch.setenv("KIMI_DESK_KERNELS", "triton")
        ids, weights = router(x)
    assert_same_routing(ids, weights, ref_ids, ref_weights)


@pytest.mark.parametrize("top_k", [1, 7, 8])
def test_shared_expert_appended(top_k):
    """With `append` (the shared expert stacked after the routed ones): one more column, that id with
    weight 1 (not scaled), after the routed choice, which is unchanged; as the PyTorch path does."""
    from kimi_desk.kernels.moe.naive import route_topk_torch

    gen = torch.Generator().manual_seed(top_k)
    logits, bias = torch.randn(5, 256, generator=gen), 0.1 * torch.randn(256, generator=gen)
    ids, weights = run_kernel(logits, bias, top_k, "sigmoid", True, SCALING, False, append=256)
    want_ids, want_weights = route_topk_torch(logits, bias, top_k, "sigmoid", True, SCALING, False, append=256)
    assert ids.shape == weights.shape == want_ids.shape == (5, top_k + 1)
    assert (ids[:, -1] == 256).all() and (weights[:, -1] == 1).all()
    assert torch.equal(want_ids[:, -1], ids[:, -1]) and torch.equal(want_weights[:, -1], weights[:, -1])
    routed, _ = run_kernel(logits, bias, top_k, "sigmoid", True, SCALING, False)
    assert torch.equal(ids[:, :top_k], routed)
    for n in range(5):
        order, want_order = ids[n, :top_k].argsort(), want_ids[n, :top_k].argsort()
        assert torch.equal(ids[n, :top_k][order], want_ids[n, :top_k][want_order])
        assert torch.allclose(weights[n, :top_k][order], want_weights[n, :top_k][want_order], rtol=1e-6)
