"""A sampled token's whole choice under top-k in one Triton launch: repetition penalty, temperature,
top-k, top-p and the draw, from one position's logits to the token id (the definition: naive.py's
`top_k_weights`, then `choose_sampled_torch`).

With top-k, at most k tokens (k <= TOP_K_MAX) can be drawn, so nothing after the top-k needs the whole
vocabulary. Each program scores its row of ROW logits (penalty, then temperature) and keeps the row's
TOP_K_MAX largest, in id order, as int64 keys: the score's rank (its bits, ordered as the floats are)
in the high half, the id in the low half. The largest are found without sorting: the n-th largest rank
bit by bit (32 counts over the row), then every rank above it and, of those equal to it, the lower ids
first, as the definition breaks ties. The last program to finish (a counter, as in top_p.py) does the
same over all rows' keys, which hold the vocabulary's k largest, and the rest on those k in registers:
weights, top-p, the draw.

PyTorch's version of the same steps is a dozen launches over the whole vocabulary (a two-step top-k,
masks, exp, the top-p kernels); a recorded decode step pays each of them every token
(BENCHMARKS.md, "A sampled token's choice").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from kimi_desk import environment
from kimi_desk.kernels import pdl_launch, zeroed_counters
from kimi_desk.kernels.grid_dependency import wait_for_previous_kernel
from kimi_desk.kernels.sampling.naive import MASS_SCALE, as_float32

# Logits per program, the largest k taken here, and the most programs (the last one holds every row's).
ROW = 2048
TOP_K_MAX = 64
MAX_ROWS = 256
MASS = tl.constexpr(MASS_SCALE)


@triton.jit
def _ranks(x, ids, valid):
    """Each score's place in the order, as an int64 in [1, 2^32) ordered as the floats are (-0.0 as 0.0);
    0 where not `valid` (the padding ranks below every score)."""
    bits = tl.where(x == 0, 0.0, x).to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64) + 2**31
    return tl.where(valid, tl.maximum(ordered, 1), 0)


@triton.jit
def _largest(ranks, valid, n):
    """Which of `ranks` are the n largest: all above the n-th largest rank, and of those equal to it the
    first in order (the lower ids), so exactly n where at least n are valid. The n-th largest is found bit
    by bit: the largest t with at least n ranks >= t."""
    threshold = tl.zeros([], dtype=tl.int64)
    for bit in tl.static_range(31, -1, -1):
        trial = threshold | (tl.full([], 1, tl.int64) << bit)
        if tl.sum((ranks >= trial).to(tl.int32), 0) >= n:
            threshold = trial
    above = ranks > threshold
    tied = (ranks == threshold) & valid
    room = n - tl.sum(above.to(tl.int32), 0)
    return above | (tied & (tl.cumsum(tied.to(tl.int32), 0) <= room))


@triton.jit
def _compact(keep, values, base, PLACES: tl.constexpr):
    """`values` where `keep`, in their order, written from `base` on (the rest of PLACES slots untouched)."""
    place = tl.cumsum(keep.to(tl.int32), 0) - 1
    tl.store(base + place, values, mask=keep & (place < PLACES))


@triton.jit
def top_k_choice_kernel(
    logits,
    seen,
    candidates,
    counter,
    uniform,
    out,
    V,
    penalty,
    temperature,
    k,
    p,
    PENALTY: tl.constexpr,
    TOP_P: tl.constexpr,
    ROW: tl.constexpr,
    KEPT: tl.constexpr,
    ROWS: tl.constexpr,
    ACCURATE_EXP: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        wait_for_previous_kernel()
    pid = tl.program_id(0)
    rows = tl.num_programs(0)
    ids = pid * ROW + tl.arange(0, ROW)
    inside = ids < V
    x = tl.load(logits + ids, mask=inside, other=0.0).to(tl.float32)
    if PENALTY:
        marked = tl.load(seen + ids, mask=inside, other=0) != 0
        x = tl.where(marked, tl.where(x > 0, x / penalty, x * penalty), x)
    x = x / temperature
    # The row's KEPT largest scores, as (rank << 32 | id), in id order; a short row pads with rank 0.
    slots = tl.arange(0, KEPT)
    tl.store(candidates + pid * KEPT + slots, pid * ROW + slots)  # rank 0: padding
    tl.debug_barrier()
    ranks = _ranks(x, ids, inside)
    _compact(_largest(ranks, inside, KEPT), (ranks << 32) | ids, candidates + pid * KEPT, KEPT)
    # Every thread's stores are done (barrier) before the count is released; the last program acquires it.
    tl.debug_barrier()
    if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == rows - 1:
        tl.debug_barrier()
        every = tl.arange(0, ROWS * KEPT)
        pooled = tl.load(candidates + every, mask=every < rows * KEPT, other=0, cache_modifier=".cg")
        pooled_ranks = (pooled >> 32) & 0xFFFFFFFF
        # The k largest of all rows' (which hold the vocabulary's k largest), in id order, into the first
        # slots of the candidates (already read), then back as one small vector.
        top = _largest(pooled_ranks, pooled_ranks > 0, k)
        tl.debug_barrier()
        _compact(top, pooled, candidates, KEPT)
        tl.debug_barrier()
        in_top_k = slots < k
        chosen_keys = tl.load(candidates + slots, mask=in_top_k, other=0, cache_modifier=".cg")
        token_ids = chosen_keys & 0xFFFFFFFF
        ordered = (((chosen_keys >> 32) & 0xFFFFFFFF) - 2**31).to(tl.int32)
        scores = tl.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
        scores = tl.where(in_top_k, scores, -float("inf"))
        shifted = scores - tl.max(scores, 0)
        if ACCURATE_EXP:
            weights = libdevice.exp(shifted)
        else:
            weights = tl.exp(shifted)
        masses = tl.where(in_top_k, tl.floor(weights * MASS).to(tl.int64), 0)
        if TOP_P:
            # The threshold: the largest weight whose tokens weighing at least as much hold the target.
            target = tl.maximum(tl.floor(tl.sum(masses, 0).to(tl.float64) * p).to(tl.int64), 1)
            at_least = tl.sum(tl.where(weights[None, :] >= weights[:, None], masses[None, :], 0), 1)
            threshold = tl.max(tl.where(in_top_k & (at_least >= target), weights, 0.0), 0)
            masses = tl.where(weights >= threshold, masses, 0)
        kept = tl.sum(masses, 0)
        rank = tl.minimum(tl.floor(tl.load(uniform) * kept.to(tl.float64)).to(tl.int64), kept - 1)
        # In id order: the first token where the running kept mass exceeds the rank.
        place = tl.sum((tl.cumsum(masses, 0) <= rank).to(tl.int32), 0)
        token = tl.sum(tl.where(slots == place, token_ids, 0), 0)
        tl.store(out, tl.minimum(token, V - 1))
        tl.debug_barrier()
        tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")


def fits_one_launch(vocab_size: int, k: int) -> bool:
    """Whether choose_top_k_triton takes a vocabulary of `vocab_size` tokens and this k."""
    return 1 <= k <= TOP_K_MAX and triton.cdiv(vocab_size, ROW) <= MAX_ROWS


def choose_top_k_triton(
    logits: torch.Tensor,
    k: int,
    top_p: float,
    uniform: torch.Tensor,
    temperature: float,
    seen: torch.Tensor | None = None,
    penalty: float = 1.0,
) -> torch.Tensor:
    """naive.py's top_k_weights, then choose_sampled_torch, in one launch: logits [V] (any float dtype, contiguous), 1 <= k <=
    TOP_K_MAX, uniform [1] float64 on the same device; `seen` [V] bool marks the penalised tokens."""
    V = logits.shape[-1]
    assert logits.dim() == 1 and fits_one_launch(V, k)
    logits = logits.contiguous()
    rows = triton.cdiv(V, ROW)
    penalised = seen is not None and penalty != 1
    candidates = torch.empty(rows * TOP_K_MAX, dtype=torch.int64, device=logits.device)
    out = torch.empty(1, dtype=torch.int64, device=logits.device)
    top_k_choice_kernel[(rows,)](
        logits,
        seen if penalised else logits,
        candidates,
        zeroed_counters(logits.device, 1),
        uniform,
        out,
        V,
        as_float32(penalty),
        as_float32(temperature),
        k,
        as_float32(top_p),
        PENALTY=penalised,
        TOP_P=top_p < 1,
        ROW=ROW,
        KEPT=TOP_K_MAX,
        ROWS=triton.next_power_of_2(rows),
        ACCURATE_EXP=not environment.triton_interpreter(),
        num_warps=16,  # the last program holds every row's candidates: 8,192 keys at the 48B model's vocabulary
        **pdl_launch(logits),
    )
    return out
