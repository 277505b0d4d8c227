"""What a sampled token's choice costs on the CPU at the 48B vocabulary (163,840): the top-p choice
kimi-desk takes there (kernels/sampling/choice_cpu.c: one call of C, three passes over the weights),
against the PyTorch form it takes without the C kernels (naive.py choose_sampled_cpu: a sort of only the
weights that can hold the mass) and the definition's (choose_sampled_torch: a sort of the whole
vocabulary), all three checked token for token first, over the spreads of logits that change how many
weights the PyTorch form sorts, at the TUI's default temperature 0.7 and top-p 0.5 / 0.9 / 0.99; then
the greedy choice, C's against torch.argmax.

    python packaging/bench/cpu/sampling_cost.py [--json OUT]

Times: the median of 30 calls after a warm-up, on all the threads PyTorch uses.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from kimi_desk.kernels.sampling.choice_cpu import choose_greedy_c, choose_sampled_c
from kimi_desk.kernels.sampling.naive import choose_sampled_cpu, choose_sampled_torch, top_p_sort_floor

V = 163840
SPREADS = (1.0, 2.0, 3.0, 5.0, 8.0)  # standard deviations of the random logits
TOP_P = (0.5, 0.9, 0.99)
TEMPERATURE = 0.7


def median_ms(fn, calls: int = 30) -> float:
    fn()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, V = {V}")
    print(
        "| logits' spread | top-p | weights sorted | whole sort, ms | PyTorch, no whole sort, ms | C, ms | speed-up |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for spread in SPREADS:
        scores = torch.randn(V, generator=gen) * spread / TEMPERATURE
        weights = torch.exp(scores - scores.max())
        for p in TOP_P:
            for u in torch.rand(8, generator=gen, dtype=torch.float64):
                uniform = u.view(1)
                want = choose_sampled_torch(weights, p, uniform)
                assert torch.equal(choose_sampled_cpu(weights, p, uniform), want)
                assert torch.equal(choose_sampled_c(weights, p, uniform), want)
            uniform = torch.tensor([0.37], dtype=torch.float64)
            whole = median_ms(lambda: choose_sampled_torch(weights, p, uniform))
            partial = median_ms(lambda: choose_sampled_cpu(weights, p, uniform))
            ours = median_ms(lambda: choose_sampled_c(weights, p, uniform))
            sorted_count = sorted_weights(weights, p)
            rows.append(
                dict(spread=spread, top_p=p, sorted=sorted_count, whole_ms=whole, torch_ms=partial, ours_ms=ours)
            )
            print(
                f"| {spread} | {p} | {sorted_count:,} | {whole:.2f} | {partial:.2f} | {ours:.3f} | "
                f"{whole / ours:.0f}x, {partial / ours:.0f}x |"
            )
    logits = torch.randn(V, generator=gen) * 3.0
    assert torch.equal(choose_greedy_c(logits), torch.argmax(logits).view(1))
    greedy = dict(argmax_ms=median_ms(lambda: torch.argmax(logits)), ours_ms=median_ms(lambda: choose_greedy_c(logits)))
    print(f"greedy: torch.argmax {greedy['argmax_ms']:.3f} ms, C {greedy['ours_ms']:.3f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(threads=torch.get_num_threads(), vocabulary=V, rows=rows, greedy=greedy), f, indent=1)
    return 0


def sorted_weights(weights: torch.Tensor, p: float) -> int:
    """How many weights choose_sampled_cpu sorts."""
    return int((weights >= top_p_sort_floor(weights, p)[0]).sum())


if __name__ == "__main__":
    raise SystemExit(main())
