"""The MoE router's choice in C (kernels/moe/router_cpu.c) on fresh random tokens and routers: ids and
weights against Router.forward's formula in float64 (the logits included), ties, NaN, the shared expert's
column, and Router.forward on the CPU through it against the PyTorch form. Ids are compared as sets
(the C call gives them in choice order, torch.topk in none)."""

import pytest
import torch
from moe_cases import SCALING, assert_same_routing, routing_reference_f64, sorted_by_id

from kimi_desk.kernels.moe import route, router_cpu, router_logits
from kimi_desk.kernels.moe.naive import route_topk_torch

pytestmark = pytest.mark.skipif(router_cpu.library() is None, reason="no C compiler or not an x86-64 CPU")


def random_router(N, E, D, dtype, seed):
    """Tokens x [N, D] in `dtype`, a float32 router [E, D] scaled as trained ones are (logits of a few
    units) and a small correction bias."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=gen).to(dtype)
    weight = torch.randn(E, D, generator=gen) * (4 / D**0.5)
    bias = torch.randn(E, generator=gen) * 0.05
    return x, weight, bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
@pytest.mark.parametrize("N,E,D,top_k", [(1, 256, 2304, 8), (16, 256, 2304, 8), (3, 8, 100, 2), (5, 300, 64, 1)])
def test_choice_matches_float64(N, E, D, top_k, activation, dtype):
    """The 48B router's shapes, and odd ones (D not a multiple of 8, E not of anything); every flag."""
    x, weight, bias = random_router(N, E, D, dtype, seed=N * 7 + E + D)
    logits64 = x.double() @ weight.double().t()
    for renormalize in (True, False):
        for weights_from_biased in (False, True):
            args = (top_k, activation, renormalize, SCALING, weights_from_biased)
            assert router_cpu.takes(x, weight, bias)
            got = router_cpu.route_cpu(x, weight, bias, *args)
            # The logits' float32 sums differ from float64 by ~1e-6 relative: the weights carry that.
            assert_same_routing(*got, *routing_reference_f64(logits64, bias, *args), tolerance=1e-5)


def test_choice_order_and_ties():
    """Ids come largest biased score first; equal scores go to the lowest ids, with equal weights."""
    x, weight, bias = torch.zeros(2, 64), torch.randn(300, 64), torch.zeros(300)
    ids, weights = router_cpu.route_cpu(x, weight, bias, 8, "sigmoid", True, SCALING)
    assert ids.tolist() == [list(range(8))] * 2
    torch.testing.assert_close(weights, torch.full((2, 8), SCALING / 8))
    bias[[40, 7, 250]] = torch.tensor([0.3, 0.2, 0.1])
    ids, _ = router_cpu.route_cpu(x, weight, bias, 4, "sigmoid", True, SCALING)
    assert ids[0].tolist() == [40, 7, 250, 0]


def test_nan_ranks_highest_and_ids_stay_in_range():
    """A NaN logit ranks highest, as in torch.topk: its expert is chosen and the weights are NaN, and no
    id falls outside the experts (the expert kernels would read out of bounds)."""
    x, weight, bias = random_router(2, 256, 64, torch.float32, seed=3)
    weight[17, 5] = float("nan")
    x[1, 5] = 0.0  # NaN * 0 is NaN: both rows see it
    ids, weights = router_cpu.route_cpu(x, weight, bias, 8, "sigmoid", True, SCALING)
    assert (ids == 17).any(dim=1).all() and ((ids >= 0) & (ids < 256)).all()
    assert torch.isnan(weights).all()


@pytest.mark.parametrize("top_k", [1, 8])
def test_shared_expert_appended(top_k):
    """With `append`: one more column, that id with weight 1 (not scaled), the routed choice unchanged."""
    x, weight, bias = random_router(4, 256, 128, torch.bfloat16, seed=top_k)
    ids, weights = router_cpu.route_cpu(x, weight, bias, top_k, "sigmoid", True, SCALING, append=256)
    routed = router_cpu.route_cpu(x, weight, bias, top_k, "sigmoid", True, SCALING)
    assert ids.shape == weights.shape == (4, top_k + 1)
    assert (ids[:, -1] == 256).all() and (weights[:, -1] == 1).all()
    assert torch.equal(ids[:, :top_k], routed[0]) and torch.equal(weights[:, :top_k], routed[1])


@pytest.mark.parametrize("N", [1, 16, 17], ids=lambda n: f"N{n}")
def test_route_on_the_cpu_matches_the_pytorch_form(N):
    """kernels.moe.route: a few tokens take the C call, more (N = 17) the PyTorch form; both choose as
    route_topk_torch on router_logits does."""
    x, weight, bias = random_router(N, 256, 2304, torch.bfloat16, seed=N)
    args = (8, "sigmoid", True, SCALING, False, 256)
    want = route_topk_torch(router_logits(x, weight), bias, *args)
    got = route(x, weight, bias, *args)
    assert_same_routing(*got, *want, tolerance=1e-5)


def test_what_the_c_call_takes():
    x, weight, bias = random_router(2, 16, 32, torch.bfloat16, seed=0)
    assert router_cpu.takes(x, weight, bias)
    assert not router_cpu.takes(x, weight.bfloat16(), bias)  # a bfloat16 router: widened by the PyTorch form
    assert not router_cpu.takes(x.t(), weight, bias)
    assert not router_cpu.takes(x.half(), weight, bias)
    assert not router_cpu.takes(x, weight[:, :16], bias)
    with pytest.raises(ValueError):
        router_cpu.route_cpu(x, weight, bias, 17, "sigmoid", True, SCALING)
    assert (
        sorted_by_id(*router_cpu.route_cpu(x, weight, bias, 16, "sigmoid", False, 1.0))[0].tolist()
        == [list(range(16))] * 2
    )
