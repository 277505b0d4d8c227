"""One-row int4 products on this CPU: AVX-512 VNNI (one_row_512) against AVX2 (one_row), alternating in one
process, medians; the threads as the first argument.

    python3 packaging/bench/results/2026-12-07-cpu-one-row-vnni/one_row_ab.py 16
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "tests" / "kernels"))
from cpu_tiles import pack_tiles
from test_quant_avx2 import scales_and_zeros

from kimi_desk.kernels.quant import avx2, quantize_int4_groups
from kimi_desk.kernels.quant.cpu import CpuInt4Layout, cpu_int4_layout
from kimi_desk.kernels.quant.naive import unpack_int4

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
lib = avx2.library()
layout = cpu_int4_layout()
rows = layout.rows if layout else 32
for name, O, D, group in [
    ("KDA projections", 12288, 2304, 128),
    ("expert gate-up", 2048, 2304, 128),
    ("expert down", 2304, 1024, 128),
    ("output head", 163840, 2304, 128),
]:
    gen = torch.Generator().manual_seed(0)
    codes, scale, zero = quantize_int4_groups(torch.randn(O, D, generator=gen), group)
    tiles = pack_tiles(unpack_int4(codes).to(torch.uint8), CpuInt4Layout(rows, True))
    sz = scales_and_zeros(scale, zero)
    x = torch.randn(1, D, generator=gen)
    times = {0: [], 1: []}
    for rep in range(40 if O < 100000 else 12):
        for on in (1, 0):
            lib.use_avx512_products(on)
            t = time.perf_counter()
            avx2.int4_linear_avx2(x, tiles, sz, rows, group)
            times[on].append(time.perf_counter() - t)
    lib.use_avx512_products(1)
    a, v = statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3
    gb = O * D / 2 / 1e9
    print(
        f"{name} [{O} x {D}] g{group} rows/tile {rows}: AVX2 {a:.3f} ms ({gb / a * 1e3:.1f} GB/s), VNNI {v:.3f} ms ({gb / v * 1e3:.1f} GB/s): {a / v:.2f}x"
    )
