"""Fresh random weights shared by the sampling tests (kernels/sampling)."""

import random

import torch


def random_weights(V: int) -> torch.Tensor:
    """exp(logit - max) of fresh random logits: wide and narrow spreads, ties, and tokens of weight 0."""
    logits = torch.randn(V) * random.choice([0.3, 2.0, 12.0])
    logits[torch.rand(V) < 0.2] = -float("inf")
    logits[0] = 0.0
    logits[torch.randint(0, V, (V // 10,))] = float(logits[torch.randint(0, V, ())])  # ties
    return torch.exp(logits - logits.max())
