"""One decode token's routed experts in RAM for one MoE layer at the 48B shapes (hidden 2304, expert
width 1024, int4 through PyTorch's CPU operator, as engine/offload.py computes them): one expert after
another (torch's intra-op threads, as the engine does) against a thread pool across the experts (the
operator releases the GIL). Torch's thread count is process-wide (set in a pool thread, it changes the
main thread's too), so each pool thread computes with the same count. The experts rotate over twelve, so
that they do not all sit in the cache.

    python packaging/bench/cpu/ram_experts_pool.py [--experts 4] [--threads 1,2] [--rounds 5]
"""

import argparse
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from kimi_desk.kernels.quant import quantize_int4_groups
from kimi_desk.kernels.quant.cpu import int4_linear_cpu, pack_int4_for_cpu

HIDDEN, WIDTH, POOL = 2304, 1024, 12


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experts", type=int, default=4, help="experts of the token in RAM (default 4)")
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}", help="torch thread counts to try")
    parser.add_argument("--rounds", type=int, default=5, help="alternations of the variants (medians reported)")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    experts = [
        [
            pack_int4_for_cpu(*quantize_int4_groups(torch.randn(o, i, generator=gen) * 0.02))
            for o, i in ((WIDTH, HIDDEN), (HIDDEN, WIDTH), (WIDTH, HIDDEN))
        ]
        for _ in range(POOL)
    ]
    x = torch.randn(1, HIDDEN).to(torch.bfloat16)

    def one(e):
        w1, w2, w3 = experts[e]
        return int4_linear_cpu(F.silu(int4_linear_cpu(x, w1)) * int4_linear_cpu(x, w3), w2).float()

    def sequential(chosen):
        return sum(one(e) for e in chosen)

    pools = {n: ThreadPoolExecutor(n) for n in (2, 4)}
    variants = {
        "one after another": sequential,
        **{f"pool of {n}": (lambda chosen, p=p: sum(p.map(one, chosen))) for n, p in pools.items()},
    }

    def ms_per_layer(fn, reps=100):
        chosen = [[(3 * r + j) % POOL for j in range(args.experts)] for r in range(reps)]
        for c in chosen[:10]:
            fn(c)
        start = time.perf_counter()
        for c in chosen:
            fn(c)
        return (time.perf_counter() - start) / reps * 1e3

    times: dict = {}
    for _ in range(args.rounds):
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            for name, fn in variants.items():
                times.setdefault((threads, name), []).append(ms_per_layer(fn))
    print(
        f"{args.experts} experts a layer, torch {torch.__version__}, {os.cpu_count()} cores, load "
        f"{os.getloadavg()[0]:.1f}"
    )
    print("| torch threads | variant | median ms | min ms |\n|---:|---|---:|---:|")
    for (threads, name), values in times.items():
        print(f"| {threads} | {name} | {statistics.median(values):.2f} | {min(values):.2f} |")


if __name__ == "__main__":
    main()
