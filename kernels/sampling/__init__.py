"""The choice of a sampled token: `choose_sampled(weights, top_p, uniform)` -> [1] int64, from the
weights exp(logit - max logit) of one position (temperature, repetition penalty and top-k applied
before: engine/generate.py), with top-p, by one uniform draw.

The definition, in integer masses so that any order of summing gives the same token, is naive.py's.
On CUDA, Triton kernels (top_p.py) find the top-p threshold by a radix select over the weights' bits
instead of sorting the vocabulary: PyTorch's sort, softmax and cumulative sums of one row (163,840
logits for the 48B model) each run in one thread block, most of the GPU idle meanwhile.
"""

from kimi_desk.kernels import use_triton
from kimi_desk.kernels.sampling.naive import choose_sampled_torch

__all__ = ["choose_sampled"]


def choose_sampled(weights, top_p, uniform):
    if use_triton(weights):
        from kimi_desk.kernels.sampling.top_p import choose_sampled_triton

        return choose_sampled_triton(weights, top_p, uniform)
    return choose_sampled_torch(weights, top_p, uniform)
