"""MLA decode attention on the CPU alone: one token's absorbed queries against a bf16 latent cache of each
length, at the demo model's shapes and the 48B model's, through the path the engine takes on the CPU
(kernels/mla: mla_attention). Prints a Markdown table of medians: wall-clock milliseconds, this process's
CPU milliseconds (robust to neighbours holding the cores, not to their use of memory bandwidth), and the
cache's bytes over the wall time.

    python packaging/bench/cpu/mla_decode.py                       # 32k, 128k, 214k; both shapes
    python packaging/bench/cpu/mla_decode.py --lengths 214000 --repeats 21 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from kimi_desk.kernels.mla import mla_attention

# name: (heads, kv_lora_rank, rope dim); the scale is 1 / sqrt(nope + rope head dim).
SHAPES = {"demo": (5, 128, 32, (64 + 32) ** -0.5), "48B": (32, 512, 64, (128 + 64) ** -0.5)}


def measure(shape: str, length: int, repeats: int) -> dict:
    H, L, R, scale = SHAPES[shape]
    generator = torch.Generator().manual_seed(0)
    # A preallocated buffer longer than the cache, as the engine's is.
    cache = torch.randn(1, length + 256, L + R, generator=generator).to(torch.bfloat16)
    q = torch.randn(1, 1, H, L + R, generator=generator)
    mla_attention(q, cache, length - 1, L, scale)  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        mla_attention(q, cache, length - 1, L, scale)
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    wall_ms, cpu_ms = 1000 * statistics.median(wall), 1000 * statistics.median(cpu)
    return dict(
        shape=shape,
        length=length,
        wall_ms=wall_ms,
        cpu_ms=cpu_ms,
        best_ms=1000 * min(wall),
        gb_s=length * (L + R) * 2 / wall_ms / 1e6,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="32768,131072,214000", help="cached tokens (default: 32768,131072,214000)")
    parser.add_argument("--shapes", default="demo,48B", help="demo, 48B or both (default)")
    parser.add_argument("--repeats", type=int, default=11, help="timed calls per point, the median kept (default: 11)")
    parser.add_argument("--threads", type=int, default=None, help="PyTorch threads (default: PyTorch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["n/a"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {' '.join(load)}")
    print(
        "\n| shape | cached | wall ms (median) | best | CPU ms (median) | cache GB/s (wall) |\n|---|---:|---:|---:|---:|---:|"
    )
    for shape in args.shapes.split(","):
        for length in (int(x) for x in args.lengths.split(",")):
            r = measure(shape, length, args.repeats)
            print(
                f"| {shape} | {length:,} | {r['wall_ms']:.2f} | {r['best_ms']:.2f} | {r['cpu_ms']:.2f} | {r['gb_s']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
