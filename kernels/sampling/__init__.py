"""The choice of a token: `choose_greedy(logits)` -> [1] int64, the first largest logit; the choice of a
sampled one: `choose_sampled(weights, top_p, uniform)` -> [1] int64, from the
weights exp(logit - max logit) of one position (temperature and repetition penalty applied before:
engine/generate.py), with top-p, by one uniform draw; `choose_top_k(logits, k, ...)` the same with
top-k, from the logits themselves.

The definition, in integer masses so that any order of summing gives the same token, is naive.py's.
On CUDA, Triton kernels (top_p.py) find the top-p threshold by a radix select over the weights' bits
instead of sorting the vocabulary: PyTorch's sort, softmax and cumulative sums of one row (163,840
logits for the 48B model) each run in one thread block, most of the GPU idle meanwhile. Under top-k
(k up to top_k.py's TOP_K_MAX) one kernel does everything from the logits (top_k.py); elsewhere the
choice is made among the k kept tokens only (naive.py's choose_top_k_torch), not the whole vocabulary.
On the CPU one call of C makes the choice in three passes over the weights (choice_cpu.c); without the
C kernels, the top-p threshold is found among the heaviest weights that can hold the mass (naive.py's
choose_sampled_cpu). Neither sorts the vocabulary.
"""

import torch

from kimi_desk.kernels import use_triton
from kimi_desk.kernels.sampling import choice_cpu
from kimi_desk.kernels.sampling.naive import (
    choose_sampled_cpu,
    choose_sampled_torch,
    choose_top_k_torch,
    top_k_weights,
)

__all__ = ["choose_greedy", "choose_sampled", "choose_top_k"]


def choose_greedy(logits):
    """The first largest of one position's logits [V] as a [1] int64 tensor on their device (torch.argmax's
    answer; on the CPU one vectorized call of C, choice_cpu.c, where torch.argmax goes element by element)."""
    if choice_cpu.takes(logits):
        return choice_cpu.choose_greedy_c(logits)
    return torch.argmax(logits).view(1)


def choose_sampled(weights, top_p, uniform):
    if use_triton(weights):
        from kimi_desk.kernels.sampling.top_p import choose_sampled_triton

        return choose_sampled_triton(weights, top_p, uniform)
    if weights.device.type == "cpu":
        if choice_cpu.takes(weights, uniform):
            return choice_cpu.choose_sampled_c(weights, top_p, uniform)
        return choose_sampled_cpu(weights, top_p, uniform)
    return choose_sampled_torch(weights, top_p, uniform)


def choose_top_k(logits, k, top_p, uniform, temperature, seen=None, penalty=1.0):
    """The token drawn by `uniform` from logits [V] under repetition penalty (`seen` [V] bool marks the
    penalised tokens), temperature, top-k (k 0 or at least V: off) and top-p: naive.py's definition."""
    if not 0 < k < logits.shape[-1]:
        return choose_sampled(top_k_weights(logits, 0, temperature, seen, penalty), top_p, uniform)
    if use_triton(logits):
        from kimi_desk.kernels.sampling.top_k import choose_top_k_triton, fits_one_launch

        if fits_one_launch(logits.shape[-1], k):
            return choose_top_k_triton(logits, k, top_p, uniform, temperature, seen, penalty)
    return choose_top_k_torch(logits, k, top_p, uniform, temperature, seen, penalty)
