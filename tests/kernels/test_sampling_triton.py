"""The sampled token's choice in Triton (kernels/sampling/top_p.py), run on CPU tensors through Triton's
interpreter, against naive.py's definition: the same token for every draw, on fresh random weights."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
from sampling_cases import random_weights  # noqa: E402

from kimi_desk.kernels.sampling.naive import choose_sampled_torch  # noqa: E402
from kimi_desk.kernels.sampling.top_p import BLOCK, choose_sampled_triton  # noqa: E402


@pytest.mark.parametrize("p", [0.9, 0.3, 1.0])
def test_the_kernels_choose_the_definitions_token(p):
    # More than one program's slice, the last one partly empty.
    weights = random_weights(random.randint(BLOCK + 1, 3 * BLOCK))
    for u in (0.0, random.random(), random.random(), 1 - 2**-52):
        uniform = torch.tensor([u], dtype=torch.float64)
        assert int(choose_sampled_triton(weights, p, uniform)) == int(choose_sampled_torch(weights, p, uniform))


def test_one_weight_and_a_peaked_distribution():
    for weights in (torch.tensor([1.0]), torch.cat([torch.ones(1), torch.zeros(BLOCK + 7)]).roll(BLOCK + 3)):
        uniform = torch.tensor([random.random()], dtype=torch.float64)
        assert int(choose_sampled_triton(weights, 0.9, uniform)) == int(torch.argmax(weights))


def random_logits(V: int) -> torch.Tensor:
    """Fresh logits at a random spread, with ties (some across rows), -inf and signed zeros."""
    logits = torch.randn(V) * random.choice([0.3, 2.0, 12.0])
    logits[torch.rand(V) < 0.1] = -float("inf")
    logits[torch.randint(0, V, (V // 20,))] = float(logits[torch.randint(0, V, ())])
    logits[torch.randint(0, V, (8,))] = float(logits.max())
    logits[torch.randint(0, V, (4,))] = 0.0
    logits[torch.randint(0, V, (4,))] = -0.0
    return logits


@pytest.mark.parametrize("k,p,penalty", [(50, 0.9, 1.3), (1, 0.9, 1.0), (7, 1.0, 0.8), (64, 0.3, 1.1)])
def test_the_top_k_kernel_chooses_the_definitions_token(k, p, penalty):
    from kimi_desk.kernels.sampling.naive import top_k_weights
    from kimi_desk.kernels.sampling.top_k import ROW, choose_top_k_triton

    # Rows of the vocabulary split over programs, the last one partly empty.
    V = random.randint(ROW + 1, 3 * ROW)
    logits = random_logits(V)
    seen = torch.rand(V) < 0.3
    temperature = random.choice([0.5, 0.7, 1.0, 1.6])
    weights = top_k_weights(logits, k, temperature, seen, penalty)
    for u in (0.0, random.random(), random.random(), random.random(), 1 - 2**-52):
        uniform = torch.tensor([u], dtype=torch.float64)
        want = int(choose_sampled_torch(weights, p, uniform))
        assert int(choose_top_k_triton(logits, k, p, uniform, temperature, seen, penalty)) == want


def test_the_top_k_kernel_on_a_short_vocabulary_and_bf16_logits():
    from kimi_desk.kernels.sampling.naive import top_k_weights
    from kimi_desk.kernels.sampling.top_k import choose_top_k_triton

    logits = random_logits(100).bfloat16()
    for k in (3, 64):
        uniform = torch.tensor([random.random()], dtype=torch.float64)
        want = int(choose_sampled_torch(top_k_weights(logits, k, 0.8), 0.95, uniform))
        assert int(choose_top_k_triton(logits, k, 0.95, uniform, 0.8)) == want
