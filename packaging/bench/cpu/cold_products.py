"""One-token products of the 48B model's decode step on this CPU with weights cold in the caches: int8
rows and int4 tiles, each shape as copies cycled through (together larger than the last-level cache, as
a decode step finds them), beside the same shape repeated (warm); bf16 activations as the int4 model
computes in. GB/s of weight bytes, medians; whether the memory is in huge pages is printed too, since
a weight on 4 KiB pages costs a page walk every 4 KiB it streams.

    python3 packaging/bench/cpu/cold_products.py --threads 16 --cold-mib 1024
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from kimi_desk.kernels.quant import avx2, quantize_int4_groups, quantize_int8_rows
from kimi_desk.kernels.quant.cpu import int4_linear_cpu, pack_int4_for_cpu

# (name, output rows, inputs): the products of one decode step of the 48B int4 model on the CPU.
INT8_SHAPES = [
    ("KDA queries, keys, gates, beta", 8480, 2304),
    ("KDA gates' second halves", 8192, 256),
    ("MLA queries", 6144, 2304),
    ("dense MLP gate-up", 18432, 2304),
    ("dense MLP down", 2304, 9216),
]
INT4_SHAPES = [
    ("KDA values", 4096, 2304),
    ("KDA output", 2304, 4096),
    ("dense MLP gate-up", 18432, 2304),
    ("output head (32-groups)", 163840, 2304),
]


def huge_pages() -> str:
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    text = mode.read_text().strip() if mode.exists() else "unknown"
    anon = [line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("AnonHugePages")]
    return f"transparent huge pages: {text}; {anon[0] if anon else ''}"


def timed(calls, reps: int) -> float:
    times = []
    for i in range(reps):
        started = time.perf_counter()
        calls[i % len(calls)]()
        times.append(time.perf_counter() - started)
    return statistics.median(times[len(calls) :] if reps > 2 * len(calls) else times[1:])


def measure(label: str, bytes_each: int, make, cold_bytes: int, x: torch.Tensor) -> None:
    copies = max(2, cold_bytes // bytes_each)
    weights = [make() for _ in range(copies)]
    cold = timed([lambda w=w: w(x) for w in weights], max(3 * copies, 30))
    warm = timed([lambda: weights[0](x)], 40)
    gb = bytes_each / 1e9
    print(
        f"{label}: cold {cold * 1e3:.3f} ms ({gb / cold:.1f} GB/s, {copies} copies), "
        f"warm {warm * 1e3:.3f} ms ({gb / warm:.1f} GB/s)",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--cold-mib", type=int, default=1024, help="bytes of copies per shape (above the L3)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, {avx2.quantized_backend()}; {huge_pages()}", flush=True)
    cold_bytes = args.cold_mib << 20
    gen = torch.Generator().manual_seed(0)
    for name, O, D in INT8_SHAPES:
        q, scale = quantize_int8_rows(torch.randn(O, D, generator=gen))
        x = torch.randn(1, D, generator=gen).bfloat16()

        def make(q=q, scale=scale):
            codes, s = q.clone(), scale.clone()
            return lambda x: avx2.int8_linear_avx2(x, codes, s)

        measure(f"int8 {name} [{O} x {D}]", O * D, make, cold_bytes, x)
    for name, O, D in INT4_SHAPES:
        group = 32 if "head" in name else 128
        codes, scale, zero = quantize_int4_groups(torch.randn(O, D, generator=gen), group)
        weight = pack_int4_for_cpu(codes, scale, zero)
        x = torch.randn(1, D, generator=gen).bfloat16()

        def make(weight=weight):
            copy = weight._replace(packed=weight.packed.clone(), scales_and_zeros=weight.scales_and_zeros.clone())
            return lambda x: int4_linear_cpu(x, copy)

        bytes_each = weight.packed.numel() + weight.scales_and_zeros.numel() * 2
        measure(f"int4 {name} [{O} x {D}]", bytes_each, make, cold_bytes, x)
    print(huge_pages())


if __name__ == "__main__":
    main()
