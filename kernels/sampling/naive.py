"""The sampled token's choice in PyTorch: the definition the Triton kernels (top_p.py) follow exactly.

The weights w [V] are exp(logit - max logit) in float32, so in [0, 1] with 1 at the most likely token.
Every sum is over integer masses, m_i = floor(w_i * 2^40) (exact in float32: a power of two times w,
then its floor), so that it does not depend on the order it is added in: a kernel that sums in many
programs at once gives the same number, and the same token, as this file.

Top-p keeps the most probable tokens whose mass reaches p of the whole: with M the total mass and
target = max(1, floor(p * M)) (p rounded to float32 first, as a kernel takes it), the threshold t is the largest weight such that the tokens weighing at
least t hold at least `target` of the mass; every token weighing at least t is kept (ties with the last
one kept included, as no order among equal weights is better than another).

Top-k (`top_k_weights`) comes before: the scores are the logits after the repetition penalty and the
temperature, and exactly k tokens keep their weight, the k of largest score, among equal scores the
lower id first; the others weigh 0.

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


def top_p_threshold_cpu(weights: torch.Tensor, p: float, mass: torch.Tensor | None = None) -> torch.Tensor:
    """top_p_threshold's weight on the CPU without sorting the vocabulary: the running mass of the
    heaviest weights in order is the same over those of at least `top_p_sort_floor` as over all the
    weights sorted, and the threshold is among them, so only they are sorted: usually a few hundred of
    the 48B model's 163,840, whose whole sort would cost a CPU decode step some 10-20 ms. `mass`: the
    weights' masses, where the caller has them."""
    if p >= 1:
        return torch.zeros(1, dtype=weights.dtype)
    floor, target = top_p_sort_floor(weights, p, mass)
    ordered = torch.sort(weights[weights >= floor], descending=True).values
    running = torch.cumsum(masses(ordered), 0)
    return ordered[torch.searchsorted(running, target).clamp(max=len(ordered) - 1).view(1)]


def top_p_sort_floor(weights: torch.Tensor, p: float, mass: torch.Tensor | None = None) -> tuple[float, int]:
    """(floor, target): the target mass of top-p `p` (< 1) and a power of two 2^-b such that the weights of
    at least 2^-b hold it. The weights are binned by their power of two in one pass (bin b holds
    [2^-b, 2^(1-b))), the bins' masses summed from the heaviest down to the first that reaches the
    target. Asks the host for the bin (no concern on the CPU, where the host is the device)."""
    mass = masses(weights) if mass is None else mass
    target = max(1, int(torch.floor(mass.sum().double() * as_float32(p))))
    # A float32 weight's biased exponent is its bits >> 23: 127 for [1, 2), so [2^-b, 2^(1-b)) is bin b
    # (weights in [0, 1]; below 2^-40 the mass is 0, wherever those fall).
    bins = torch.clamp(127 - (weights.float().view(torch.int32) >> 23), 0, 63).to(torch.int64)
    heavier = torch.cumsum(torch.zeros(64, dtype=torch.int64).scatter_add_(0, bins, mass), 0)
    b = int(torch.searchsorted(heavier, target).clamp(max=63))
    return 2.0**-b, target


def choose_sampled_cpu(weights: torch.Tensor, p: float, uniform: torch.Tensor) -> torch.Tensor:
    """choose_sampled_torch's token on the CPU: its threshold by top_p_threshold_cpu, and the running
    kept mass over the kept tokens only (in vocabulary order, as the definition runs it; the others add
    nothing to it)."""
    mass = masses(weights)
    kept = torch.nonzero(weights >= top_p_threshold_cpu(weights, p, mass)).flatten()
    return kept[_drawn_index(torch.cumsum(mass[kept], 0), uniform)]


def choose_sampled_torch(weights: torch.Tensor, p: float, uniform: torch.Tensor) -> torch.Tensor:
    """The token drawn from `weights` [V] under top-p `p` by the draw `uniform` ([1] float64), as a [1]
    int64 tensor on their device, with no host synchronisation."""
    kept = masses(weights).masked_fill(weights < top_p_threshold(weights, p), 0)
    return _drawn_index(torch.cumsum(kept, 0), uniform)


def _drawn_index(running: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The definition's choice over running kept masses [n]: the first index where the running mass
    exceeds r = min(floor(u * K), K - 1), K the whole kept mass, as a [1] int64 tensor."""
    draw = torch.minimum(torch.floor(uniform * running[-1:].double()).to(torch.int64), running[-1:] - 1)
    return torch.searchsorted(running, draw, right=True).clamp(max=len(running) - 1)


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: logits of seen tokens are divided by `penalty` when positive, multiplied when
    negative, so a penalty above 1 always makes them less likely. logits [V] float, seen [V] bool."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_kept(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[V] bool: exactly the k largest scores (0 < k < V), among equal ones the lower id first."""
    kth = torch.topk(scores, k).values[-1]
    above, tied = scores > kth, scores == kth
    return above | (tied & (torch.cumsum(tied, 0) <= k - above.sum()))


def filter_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The top_k_kept scores, the rest -inf (k 0 or at least V: all kept)."""
    if k <= 0 or k >= scores.shape[-1]:
        return scores
    return scores.masked_fill(~top_k_kept(scores, k), -float("inf"))


def top_k_weights(
    logits: torch.Tensor, k: int, temperature: float, seen: torch.Tensor | None = None, penalty: float = 1.0
) -> torch.Tensor:
    """The weights of a sampled choice under top-k: exp(score - max score) in float32 over the
    top_k_kept `sampling_scores`, 0 elsewhere."""
    scores = filter_top_k(sampling_scores(logits, temperature, seen, penalty), k)
    return torch.exp(scores - scores.max())


def sampling_scores(
    logits: torch.Tensor, temperature: float, seen: torch.Tensor | None = None, penalty: float = 1.0
) -> torch.Tensor:
    """The logits in float32 after the repetition penalty (when `seen` marks tokens) and the temperature."""
    scores = logits.float()
    if seen is not None and penalty != 1:
        scores = penalize_repetition(scores, seen, penalty)
    return scores / temperature


def choose_top_k_torch(
    logits: torch.Tensor,
    k: int,
    top_p: float,
    uniform: torch.Tensor,
    temperature: float,
    seen: torch.Tensor | None = None,
    penalty: float = 1.0,
) -> torch.Tensor:
    """choose_sampled_torch(top_k_weights(...)) on the k kept tokens only (0 < k < V): their weights in
    id order give the same token as the whole vocabulary's, where every other weight is 0; the top-p
    threshold then sorts k weights, not V. No host synchronisation (static shapes)."""
    scores = sampling_scores(logits, temperature, seen, penalty)
    V = scores.shape[-1]
    kept = top_k_kept(scores, k)
    # The kept ids in increasing order: the k largest of (V - id) over the kept tokens.
    countdown = torch.arange(V, 0, -1, device=scores.device)
    ids = V - torch.topk(countdown.masked_fill(~kept, 0), k).values
    chosen = scores[ids]
    return ids[choose_sampled_torch(torch.exp(chosen - chosen.max()), top_p, uniform)]
