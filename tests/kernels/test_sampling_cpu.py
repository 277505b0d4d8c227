"""A token's choice in C (kernels/sampling/choice_cpu.c) on fresh random rows: the top-p choice against
naive.py's definition, the same token for every draw, and the greedy one against torch.argmax."""

import random

import pytest
import torch
from sampling_cases import random_weights

from kimi_desk.kernels.sampling import choice_cpu
from kimi_desk.kernels.sampling.naive import choose_sampled_torch

pytestmark = pytest.mark.skipif(choice_cpu.library() is None, reason="no C compiler or not an x86-64 CPU")


def test_the_c_choice_is_the_definitions():
    """Vocabularies from a few tokens to the 48B model's, peaked and flat (a spread of 0.01 puts every
    weight in one power of two, where the threshold is found by the mantissa alone), ties, tokens of
    weight 0, p from tiny to 1, draws at both ends of [0, 1)."""
    for V in (1, 3, 64, 700, 5000, 163840):
        for sharpness in (0.01, 0.3, 1.0, 8.0):
            weights = random_weights(V) ** sharpness
            weights[torch.randint(0, V, (max(1, V // 50),))] = weights.max() / 3  # ties
            for p in (0.01, 0.5, 0.9, 0.999, 1.0, random.random()):
                for u in (0.0, random.random(), 1 - 2**-52):
                    uniform = torch.tensor([u], dtype=torch.float64)
                    assert choice_cpu.takes(weights, uniform)
                    want = choose_sampled_torch(weights, p, uniform)
                    assert torch.equal(choice_cpu.choose_sampled_c(weights, p, uniform), want), (V, sharpness, p, u)


def test_the_cpu_dispatch_takes_the_c_choice_for_float32_weights():
    from kimi_desk.kernels.sampling import choose_sampled

    weights = random_weights(1000)
    uniform = torch.rand(1, dtype=torch.float64)
    assert choice_cpu.takes(weights, uniform)
    assert not choice_cpu.takes(weights.double(), uniform) and not choice_cpu.takes(weights[::2], uniform)
    assert torch.equal(choose_sampled(weights, 0.9, uniform), choose_sampled_torch(weights, 0.9, uniform))


def test_the_c_greedy_choice_is_torch_argmax():
    """The first largest, on rows of every length around the 8-lane blocks, with ties (the first wins,
    -0.0 and 0.0 equal), all -inf, and NaNs (torch.argmax gives the first NaN)."""
    for n in (1, 7, 8, 9, 63, 1000, 163840):
        for case in ("random", "ties", "zeros", "-inf", "nan"):
            logits = torch.randn(n) * random.choice([0.1, 3.0])
            if case == "ties":
                logits[torch.randint(0, n, (3,))] = logits.max() + 1
            elif case == "zeros":
                logits = (
                    torch.where(torch.rand(n) < 0.5, torch.tensor(-0.0), torch.tensor(0.0))
                    - (torch.rand(n) < 0.5).float()
                )
            elif case == "-inf":
                logits = torch.full((n,), -float("inf"))
            elif case == "nan":
                logits[torch.randint(0, n, (2,))] = float("nan")
            assert choice_cpu.takes(logits)
            assert torch.equal(choice_cpu.choose_greedy_c(logits), torch.argmax(logits).view(1)), (n, case)
