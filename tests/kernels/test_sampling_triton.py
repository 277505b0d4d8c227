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
