"""One-row products on this CPU, AVX-512 VNNI against AVX2, alternating in one process, medians: int4
(one_row_512 against one_row) and int8 rows (int8_four_rows_512 against int8_four_rows), at the 48B
model's decode shapes; the threads as the first argument.

    python3 packaging/bench/results/2026-12-07-cpu16-vnni-decode/products_ab.py 16
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "tests" / "kernels"))
from cpu_tiles import pack_tiles
from test_quant_avx2 import scales_and_zeros

from kimi_desk.kernels.quant import avx2, quantize_int4_groups, quantize_int8_rows
from kimi_desk.kernels.quant.cpu import CpuInt4Layout, cpu_int4_layout
from kimi_desk.kernels.quant.naive import unpack_int4

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
lib = avx2.library()
layout = cpu_int4_layout()
rows = layout.rows if layout else 32


def alternate(call, reps):
    times = {0: [], 1: []}
    for _ in range(reps):
        for on in (1, 0):
            lib.use_avx512_products(on)
            t = time.perf_counter()
            call()
            times[on].append(time.perf_counter() - t)
    lib.use_avx512_products(1)
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3


gen = torch.Generator().manual_seed(0)
for name, O, D in [
    ("KDA projections", 12288, 2304),
    ("expert gate-up", 2048, 2304),
    ("expert down", 2304, 1024),
    ("output head", 163840, 2304),
]:
    codes, scale, zero = quantize_int4_groups(torch.randn(O, D, generator=gen), 128)
    tiles = pack_tiles(unpack_int4(codes).to(torch.uint8), CpuInt4Layout(rows, True))
    sz = scales_and_zeros(scale, zero)
    x = torch.randn(1, D, generator=gen)
    a, v = alternate(lambda: avx2.int4_linear_avx2(x, tiles, sz, rows, 128), 40 if O < 100000 else 12)
    gb = O * D / 2 / 1e9
    print(
        f"int4 {name} [{O} x {D}]: AVX2 {a:.3f} ms ({gb / a * 1e3:.1f} GB/s), VNNI {v:.3f} ms ({gb / v * 1e3:.1f} GB/s): {a / v:.2f}x"
    )
for name, O, D in [
    ("KDA queries or keys", 4096, 2304),
    ("dense MLP gate-up", 18432, 2304),
    ("dense MLP down", 2304, 9216),
    ("MLA queries", 6144, 1536),
]:
    q, scale = quantize_int8_rows(torch.randn(O, D, generator=gen))
    x = torch.randn(1, D, generator=gen)
    a, v = alternate(lambda: avx2.int8_linear_avx2(x, q, scale), 40)
    gb = O * D / 1e9
    print(
        f"int8 {name} [{O} x {D}]: AVX2 {a:.3f} ms ({gb / a * 1e3:.1f} GB/s), VNNI {v:.3f} ms ({gb / v * 1e3:.1f} GB/s): {a / v:.2f}x"
    )
