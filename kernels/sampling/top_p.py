"""The sampled token's choice (naive.py's definition) in Triton, without sorting the vocabulary.

The top-p threshold is a weight, found bit by bit: weights are non-negative float32, so their bit
patterns, read as integers, are in the weights' order, and at most 1.0, so 30 bits tell them apart.
Six `top_p_pass_kernel` launches each settle five more bits of the threshold (a radix select): every
program sums the masses of its slice of the vocabulary by the next five bits, among the tokens whose
higher bits equal the threshold's so far, and adds its 32 sums into a shared histogram (integer
atomics: the same totals in any order); the last program to finish (a counter, as in
kernels/quant/gemv.py) walks the histogram from the top and takes the highest digit where the mass
above the threshold so far, plus the bins from that digit up, still reaches the target. The first pass
also sums the whole mass and sets the target.

`top_p_choose_kernel` then sums each slice's kept mass; its last program turns the draw into a rank
within the kept mass, finds the slice holding it from the slices' sums and the token within that slice
from its running sum, and puts the shared buffers back to zero for the next call. Seven small launches
with fixed grids and nothing asked of the host, so a CUDA graph records them; the result is naive.py's
bit for bit (integer sums, the same float32 weights and float64 draw).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_desk.kernels import pdl_launch
from kimi_desk.kernels.grid_dependency import wait_for_previous_kernel
from kimi_desk.kernels.sampling.naive import MASS_SCALE

# Bits settled per pass, and the scratch layout (int64): the threshold's bits so far, the mass above it,
# the target, the programs' counter, then one histogram per pass, then the slices' kept masses.
# Constexprs, as a Triton kernel reads module constants (`.value` on the host).
# A weight is at most 1.0 (0x3F800000): its two top bits are zero, 30 bits to settle.
WEIGHT_BITS = tl.constexpr(30)
DIGIT_BITS = tl.constexpr(5)
PASSES = tl.constexpr(WEIGHT_BITS.value // DIGIT_BITS.value)
BINS = tl.constexpr(1 << DIGIT_BITS.value)
PREFIX, ABOVE, TARGET, COUNTER, HISTOGRAMS = (tl.constexpr(i) for i in (0, 1, 2, 3, 8))
SLICE_SUMS = tl.constexpr(HISTOGRAMS.value + PASSES.value * BINS.value)
MASS = tl.constexpr(MASS_SCALE)
# Tokens per program: each reads its slice in one load and compares it with every bin at once
# ([BLOCK, BINS]); a loop over smaller steps waits for each step's load in turn.
BLOCK = 256
MAX_PROGRAMS = 1024


@triton.jit
def _slice_masses(w, pid, V, BLOCK: tl.constexpr):
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    weights = tl.load(w + offsets, mask=offsets < V, other=0.0)
    bits = weights.to(tl.int32, bitcast=True).to(tl.int64)
    return bits, tl.floor(weights * MASS).to(tl.int64)


@triton.jit
def top_p_pass_kernel(
    w,
    scratch,
    p,
    V,
    PASS: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        wait_for_previous_kernel()
    pid = tl.program_id(0)
    SHIFT: tl.constexpr = WEIGHT_BITS - DIGIT_BITS * (PASS + 1)
    bins = tl.arange(0, BINS)
    prefix = tl.load(scratch + PREFIX)
    bits, mass = _slice_masses(w, pid, V, BLOCK)
    if PASS > 0:
        mass = tl.where((bits >> (SHIFT + DIGIT_BITS)) == prefix, mass, 0)
    digit = (bits >> SHIFT) & (BINS - 1)
    histogram = tl.sum(tl.where(digit[:, None] == bins[None, :], mass[:, None], 0), 0)
    tl.atomic_add(scratch + HISTOGRAMS + PASS * BINS + bins, histogram, sem="relaxed", scope="gpu")
    # Every thread's adds are done (barrier) before the count is released; the last program acquires it.
    tl.debug_barrier()
    if tl.atomic_add(scratch + COUNTER, 1, sem="acq_rel", scope="gpu") == tl.num_programs(0) - 1:
        tl.debug_barrier()
        totals = tl.load(scratch + HISTOGRAMS + PASS * BINS + bins, cache_modifier=".cg")
        if PASS == 0:
            above = tl.zeros([], dtype=tl.int64)
            target = tl.maximum(tl.floor(tl.sum(totals).to(tl.float64) * p).to(tl.int64), 1)
            tl.store(scratch + TARGET, target)
        else:
            above = tl.load(scratch + ABOVE, cache_modifier=".cg")
            target = tl.load(scratch + TARGET, cache_modifier=".cg")
        from_bin_up = tl.sum(totals) - tl.cumsum(totals, 0) + totals  # mass in this bin and the ones above
        settled = tl.max(tl.where(above + from_bin_up >= target, bins, -1), 0)
        tl.store(scratch + ABOVE, above + tl.sum(tl.where(bins > settled, totals, 0), 0))
        tl.store(scratch + PREFIX, prefix * BINS + settled)
        tl.atomic_xchg(scratch + COUNTER, 0, sem="relaxed", scope="gpu")


@triton.jit
def top_p_choose_kernel(
    w,
    scratch,
    uniform,
    out,
    V,
    TOP_P: tl.constexpr,
    BLOCK: tl.constexpr,
    PROGRAMS: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        wait_for_previous_kernel()
    pid = tl.program_id(0)
    if TOP_P:
        threshold = tl.load(scratch + PREFIX)
    else:
        threshold = tl.zeros([], dtype=tl.int64)
    bits, mass = _slice_masses(w, pid, V, BLOCK)
    tl.store(scratch + SLICE_SUMS + pid, tl.sum(tl.where(bits >= threshold, mass, 0), 0))
    tl.debug_barrier()
    if tl.atomic_add(scratch + COUNTER, 1, sem="acq_rel", scope="gpu") == tl.num_programs(0) - 1:
        tl.debug_barrier()
        slices = tl.arange(0, PROGRAMS)
        sums = tl.load(scratch + SLICE_SUMS + slices, mask=slices < tl.num_programs(0), other=0, cache_modifier=".cg")
        kept = tl.sum(sums, 0)
        rank = tl.minimum(tl.floor(tl.load(uniform) * kept.to(tl.float64)).to(tl.int64), kept - 1)
        # The slice where the running kept mass first exceeds the rank, then the token within it.
        chosen = tl.sum((tl.cumsum(sums, 0) <= rank).to(tl.int32), 0)
        rank -= tl.sum(tl.where(slices < chosen, sums, 0), 0)
        bits, mass = _slice_masses(w, chosen, V, BLOCK)
        running = tl.cumsum(tl.where(bits >= threshold, mass, 0), 0)
        token = chosen.to(tl.int64) * BLOCK + tl.sum((running <= rank).to(tl.int64), 0)
        tl.store(out, tl.minimum(token, V - 1))
        # Back to zero for the next call (a CUDA graph replays the same buffers).
        tl.store(scratch + tl.arange(0, HISTOGRAMS), tl.zeros([HISTOGRAMS], dtype=tl.int64))
        for step in tl.static_range(PASSES):
            tl.store(scratch + HISTOGRAMS + step * BINS + tl.arange(0, BINS), tl.zeros([BINS], dtype=tl.int64))


_scratch: dict = {}


def _zeroed_scratch(device) -> torch.Tensor:
    """The kernels' shared int64 buffer on `device`, all zeros between calls (each call leaves it so)."""
    scratch = _scratch.get(device)
    if scratch is None:
        scratch = _scratch[device] = torch.zeros(SLICE_SUMS.value + MAX_PROGRAMS, dtype=torch.int64, device=device)
    return scratch


def choose_sampled_triton(weights: torch.Tensor, top_p: float, uniform: torch.Tensor) -> torch.Tensor:
    """naive.choose_sampled_torch in Triton: weights [V] float32 contiguous, uniform [1] float64."""
    assert weights.dim() == 1 and weights.dtype == torch.float32
    weights = weights.contiguous()
    V = weights.shape[0]
    programs = triton.cdiv(V, BLOCK)
    assert programs <= MAX_PROGRAMS, f"a vocabulary of at most {MAX_PROGRAMS * BLOCK} tokens, got {V}"
    scratch = _zeroed_scratch(weights.device)
    out = torch.empty(1, dtype=torch.int64, device=weights.device)
    launch = pdl_launch(weights)
    if top_p < 1:
        for step in range(PASSES.value):
            top_p_pass_kernel[(programs,)](weights, scratch, float(top_p), V, PASS=step, BLOCK=BLOCK, **launch)
    top_p_choose_kernel[(programs,)](
        weights,
        scratch,
        uniform,
        out,
        V,
        TOP_P=top_p < 1,
        BLOCK=BLOCK,
        PROGRAMS=triton.next_power_of_2(programs),
        **launch,
    )
    return out
