"""The sampled token's definition (kernels/sampling/naive.py) against a brute-force reading of it on
fresh random weights: every candidate threshold tried, every token's chance counted."""

import random

import torch
from sampling_cases import random_weights

from kimi_desk.kernels.sampling.naive import as_float32, choose_sampled_torch, masses, top_p_threshold


def test_the_threshold_is_the_largest_weight_whose_heavier_tokens_reach_the_target():
    for _ in range(20):
        weights = random_weights(random.randint(2, 300))
        p = random.choice([0.01, 0.5, 0.9, 0.999, random.random()])
        mass = [int(m) for m in masses(weights)]
        target = max(1, int(sum(mass) * as_float32(p)))
        candidates = [float(w) for w in weights if sum(m for m, v in zip(mass, weights) if v >= w) >= target]
        assert float(top_p_threshold(weights, p)) == max(candidates)


def test_a_few_exact_weights():
    weights = torch.tensor([0.125, 1.0, 0.5, 0.375])  # masses in exact proportion 1 : 8 : 4 : 3
    for p, kept in ((0.6, [0, 1, 1, 0]), (0.75, [0, 1, 1, 0]), (0.76, [0, 1, 1, 1]), (0.01, [0, 1, 0, 0])):
        assert (weights >= top_p_threshold(weights, p)).int().tolist() == kept
    assert float(top_p_threshold(weights, 1.0)) == 0


def test_each_kept_token_is_drawn_by_its_share_of_the_kept_mass():
    """Every draw u = j / n on a grid: token i is drawn for a share m_i / K of them (to within one
    grid step), the others never."""
    weights = random_weights(random.randint(5, 60))
    p = random.choice([0.5, 0.9, 1.0])
    kept = torch.where(weights >= top_p_threshold(weights, p), masses(weights), 0).double()
    n = 4000
    draws = [int(choose_sampled_torch(weights, p, torch.tensor([j / n], dtype=torch.float64))) for j in range(n)]
    counts = torch.bincount(torch.tensor(draws), minlength=len(weights)).double()
    assert torch.all(counts[kept == 0] == 0)
    assert torch.allclose(counts / n, kept / kept.sum(), atol=1.5 / n)
