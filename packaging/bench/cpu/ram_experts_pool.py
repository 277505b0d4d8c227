"""One decode token's routed experts in RAM for one MoE layer at the 48B shapes (hidden 2304, expert
width 1024, int4 through PyTorch's CPU operator, as engine/offload.py computes them), three ways:
- "3 products, serial": one expert after another, w1, w3 and w2 each a product over torch's intra-op
  threads (the engine today);
- "w1|w3 joined, serial": w1 and w3 packed as one matrix of 2,048 rows, so a token's expert is two
  products, each with more rows to share among the threads;
- "w1|w3 joined, pool of P": the chosen experts spread over P Python threads (the operator releases
  the GIL), each product with torch's intra-op threads as set;
- "w1|w3 joined, serial, pinned": as the engine holds RAM experts beside a GPU, in page-locked memory
  (for the prefill's asynchronous copies), stacked over the experts (with --pinned, where CUDA is);
- "w1|w3 joined, serial, X ms idle before": the host sleeps between layers as while the GPU works (the
  threads of torch's pool may fall asleep and must be woken), only the products timed.
The RAM read rate of torch's threads (a plain sum) is printed first: the ceiling any product could reach.
Torch's thread count is process-wide, so every variant runs under the same count T. The experts rotate
over POOL (96, about 340 MB in int4: more than a CPU's caches), as a real token's experts come from RAM.

    python packaging/bench/cpu/ram_experts_pool.py [--experts 3,8] [--threads 1,2,4,8,16] [--rounds 3]
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

HIDDEN, WIDTH, POOL = 2304, 1024, 96


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experts", default="3,8", help="experts of the token in RAM in one layer")
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}", help="torch thread counts to try")
    parser.add_argument("--pools", default="2,4,8", help="Python thread pool sizes to try")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the variants (medians reported)")
    parser.add_argument("--pinned", action="store_true", help="also time the experts in pinned memory")
    parser.add_argument("--idle-ms", type=float, default=0.5, help="host idle between layers, one variant")
    parser.add_argument("--reps", type=int, default=60, help="layers timed per measurement")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    separate, joined = [], []
    for _ in range(POOL):
        w1, w3 = (torch.randn(WIDTH, HIDDEN, generator=gen) * 0.02 for _ in range(2))
        w2 = torch.randn(HIDDEN, WIDTH, generator=gen) * 0.02
        pack = lambda w: pack_int4_for_cpu(*quantize_int4_groups(w))  # noqa: E731
        p2 = pack(w2)
        separate.append((pack(w1), p2, pack(w3)))
        joined.append((pack(torch.cat([w1, w3])), p2))
    x = torch.randn(1, HIDDEN).to(torch.bfloat16)
    pinned = []
    if args.pinned:
        for part in range(2):
            ones = [j[part] for j in joined]
            stack = torch.empty((POOL, *ones[0].packed.shape), dtype=torch.uint8, pin_memory=True)
            sz = torch.empty((POOL, *ones[0].scales_and_zeros.shape), dtype=torch.bfloat16, pin_memory=True)
            for e, one in enumerate(ones):
                stack[e].copy_(one.packed)
                sz[e].copy_(one.scales_and_zeros)
            pinned.append([one._replace(packed=stack[e], scales_and_zeros=sz[e]) for e, one in enumerate(ones)])
        pinned = list(zip(*pinned))

    def three(e):
        w1, w2, w3 = separate[e]
        return int4_linear_cpu(F.silu(int4_linear_cpu(x, w1)) * int4_linear_cpu(x, w3), w2).float()

    def two(e, experts=joined):
        w13, w2 = experts[e]
        gate, up = int4_linear_cpu(x, w13).split(WIDTH, dim=-1)
        return int4_linear_cpu(F.silu(gate) * up, w2).float()

    pools = {p: ThreadPoolExecutor(p) for p in (int(p) for p in args.pools.split(","))}
    variants = {
        "3 products, serial": lambda chosen: sum(three(e) for e in chosen),
        "w1|w3 joined, serial": lambda chosen: sum(two(e) for e in chosen),
        **({"w1|w3 joined, serial, pinned": lambda chosen: sum(two(e, pinned) for e in chosen)} if pinned else {}),
        **{f"w1|w3 joined, pool of {p}": (lambda chosen, ex=ex: sum(ex.map(two, chosen))) for p, ex in pools.items()},
    }

    def ms_per_layer(fn, n, idle_s=0.0):
        """Mean ms of fn over the layers; with idle_s, the host sleeps that long between layers (as it
        does while the GPU computes the rest of a layer), and only fn's own time is counted."""
        chosen = [[(7 * r + 13 * j) % POOL for j in range(n)] for r in range(args.reps)]
        for c in chosen[:5]:
            fn(c)
        total = 0.0
        for c in chosen:
            if idle_s:
                time.sleep(idle_s)
            start = time.perf_counter()
            fn(c)
            total += time.perf_counter() - start
        return total / args.reps * 1e3

    times: dict = {}
    counts = [int(n) for n in args.experts.split(",")]
    for _ in range(args.rounds):
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            for name, fn in variants.items():
                for n in counts:
                    times.setdefault((n, threads, name), []).append(ms_per_layer(fn, n))
            for n in counts:
                idle = ms_per_layer(variants["w1|w3 joined, serial"], n, idle_s=args.idle_ms / 1e3)
                times.setdefault((n, threads, f"w1|w3 joined, serial, {args.idle_ms} ms idle before"), []).append(idle)
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    # The ceiling: how fast torch's threads read RAM at all (a sum over 1 GiB, no products).
    big = torch.ones(2**27, dtype=torch.int64)
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        big.sum()
        start = time.perf_counter()
        for _ in range(3):
            big.sum()
        read = 3 * big.numel() * 8 / (time.perf_counter() - start) / 1e9
        print(f"RAM read by {threads} torch threads (sum over 1 GiB): {read:.1f} GB/s")
    expert_bytes = sum(w.packed.numel() + w.scales_and_zeros.numel() * 2 for w in separate[0])
    print("| experts | torch threads | variant | median ms | min ms | GB/s (median) |\n|---:|---:|---|---:|---:|---:|")
    for (n, threads, name), values in sorted(times.items()):
        med = statistics.median(values)
        print(f"| {n} | {threads} | {name} | {med:.3f} | {min(values):.3f} | {n * expert_bytes / med / 1e6:.1f} |")


if __name__ == "__main__":
    main()
