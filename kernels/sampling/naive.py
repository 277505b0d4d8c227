"""The sampled token's choice in PyTorch: the definition the Triton kernels (top_p.py) follow exactly.

The weights w [V] are exp(logit - max logit) in float32, so in [0, 1] with 1 at the most likely token.
Every sum is over integer masses, m_i = floor(w_i * 2^40) (exact in float32: a power of two times w,
then its floor), so that it does not depend on the order it is added in: a kernel that sums in many
programs at once gives the same number, and the same token, as this file.

Top-p keeps the most probable tokens whose mass reaches p of the whole: with M the total mass and
target = max(1, floor(p * M)) (p rounded to float32 first, as a kernel takes it), the threshold t is the largest weight such that the tokens weighing at
least t hold at least `target` of the mass; every token weighing at least t is kept (ties with the last
one kept included, as no order among equal weights is better than another).

The choice: K is the kept mass, r = min(floor(u * K), K - 1) for the uniform draw u in [0, 1), and the
token is the first, in vocabulary order, where the running kept mass exceeds r: token i is drawn with
probability m_i / K. A token of mass 0 (weight under 2^-40 of the most likely one's) is never drawn.
"""

from __future__ import annotations

import struct

import torch

MASS_SCALE = 2.0**40


def masses(weights: torch.Tensor) -> torch.Tensor:
    return torch.floor(weights * MASS_SCALE).to(torch.int64)


def as_float32(value: float) -> float:
    """`value` rounded to float32, on the host."""
    return struct.unpack("f", struct.pack("f", value))[0]


def top_p_threshold(weights: torch.Tensor, p: float) -> torch.Tensor:
    """The weight t of the definition above, as a [1] float32 tensor (0 when p >= 1: all kept)."""
    if p >= 1:
        return torch.zeros(1, dtype=weights.dtype, device=weights.device)
    ordered = torch.sort(weights, descending=True).values
    running = torch.cumsum(masses(ordered), 0)
    target = torch.floor(running[-1:].double() * as_float32(p)).to(torch.int64).clamp(min=1)
    return ordered[torch.searchsorted(running, target).clamp(max=len(ordered) - 1)]


def choose_sampled_torch(weights: torch.Tensor, p: float, uniform: torch.Tensor) -> torch.Tensor:
    """The token drawn from `weights` [V] under top-p `p` by the draw `uniform` ([1] float64), as a [1]
    int64 tensor on their device, with no host synchronisation."""
    kept = masses(weights).masked_fill(weights < top_p_threshold(weights, p), 0)
    running = torch.cumsum(kept, 0)
    draw = torch.minimum(torch.floor(uniform * running[-1:].double()).to(torch.int64), running[-1:] - 1)
    return torch.searchsorted(running, draw, right=True).clamp(max=len(weights) - 1)
