"""The sampled token's definition (kernels/sampling/naive.py) against a brute-force reading of it on
fresh random weights: every candidate threshold tried, every token's chance counted."""

import random

import torch
from sampling_cases import random_weights

from kimi_desk.kernels.sampling.naive import (
    as_float32,
    choose_sampled_cpu,
    choose_sampled_torch,
    masses,
    top_p_threshold,
    top_p_threshold_cpu,
)


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


def test_the_choice_among_the_k_kept_tokens_is_the_whole_vocabularys():
    """choose_top_k_torch draws among the k kept tokens only: the token of the definition (the whole
    vocabulary's weights, 0 off the top k), for draws across [0, 1); ties at the k-th score and -inf."""
    from kimi_desk.kernels.sampling.naive import choose_top_k_torch, top_k_weights

    for _ in range(10):
        V = random.randint(60, 3000)
        logits = torch.log(random_weights(V)) * random.choice([1.0, 3.0])
        logits[torch.randint(0, V, (6,))] = float(logits.sort().values[-20])  # ties near the k-th
        seen = torch.rand(V) < 0.3
        k, p = random.choice([1, 5, 20, 50]), random.choice([0.5, 0.9, 1.0])
        temperature, penalty = random.choice([0.5, 1.0, 1.7]), random.choice([1.0, 1.3])
        weights = top_k_weights(logits, k, temperature, seen, penalty)
        for u in (0.0, random.random(), random.random(), 1 - 2**-52):
            uniform = torch.tensor([u], dtype=torch.float64)
            want = int(choose_sampled_torch(weights, p, uniform))
            assert int(choose_top_k_torch(logits, k, p, uniform, temperature, seen, penalty)) == want


def test_the_cpu_threshold_and_token_are_the_sorting_ones():
    """top_p_threshold_cpu, which sorts only the heaviest weights it needs, gives top_p_threshold's
    weight and the same token, on vocabularies from a few tokens to the 48B model's, peaked and flat,
    with ties, including prefixes that fall short and the whole vocabulary."""
    for V in (3, 64, 65, 700, 5000, 163840):
        for sharpness in (0.3, 1.0, 8.0):
            weights = random_weights(V) ** sharpness
            weights[torch.randint(0, V, (max(1, V // 50),))] = weights.max() / 3  # ties
            for p in (0.01, 0.5, 0.9, 0.999, 1.0):
                assert torch.equal(top_p_threshold_cpu(weights, p), top_p_threshold(weights, p))
                uniform = torch.tensor([random.random()], dtype=torch.float64)
                assert torch.equal(choose_sampled_cpu(weights, p, uniform), choose_sampled_torch(weights, p, uniform))
