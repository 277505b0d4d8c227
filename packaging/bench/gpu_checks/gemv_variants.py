"""GPU check: fp8 GEMV variants at the 48B decode shapes, one token, each in a CUDA graph, checked against
float64. Prints a table last. Run from the repo root on the device:
source packaging/source_shim.sh && python3 packaging/bench/gpu_checks/gemv_variants.py"""

import torch
import triton

from kimi_desk.kernels.quant import dequantize_rows, quantize_fp8_rows
from kimi_desk.kernels.quant.gemv import row_scaled_gemv

dev = "cuda"
shapes = [(12544, 2304), (18432, 2304), (6464, 2304), (2304, 4096), (1024, 2304), (8192, 256)]
variants = {
    "32x128 s4 (default)": dict(),
    "32x128 s4 min 528": dict(min_programs=528),
    "32x128 s4 min 1056": dict(min_programs=1056),
    "32x128 s6": dict(num_stages=6),
    "64x128 s4 min 528": dict(block_o=64, min_programs=528),
    "32x256 s3 min 528": dict(block_d=256, num_stages=3, min_programs=528),
}
res = {}
for O, D in shapes:
    q, s = quantize_fp8_rows(torch.randn(O, D, device=dev))
    copies = [q.clone() for _ in range(8)]  # distinct memory, so that L2 never holds the next weight
    x = torch.randn(1, D, device=dev).bfloat16()
    ref = x.double() @ dequantize_rows(q, s, torch.float64).T
    for name, cfg in variants.items():
        cfg = dict(cfg, pdl=False)
        y = row_scaled_gemv(x, q, s, cfg)
        err = ((y.double() - ref).norm() / ref.norm()).item()
        st = torch.cuda.Stream()
        st.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(st):
            row_scaled_gemv(x, q, s, cfg)
        torch.cuda.current_stream().wait_stream(st)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for c in copies:  # 8 products in a row: one replay's own cost spread over them
                row_scaled_gemv(x, c, s, cfg)
        us = triton.testing.do_bench(g.replay, warmup=25, rep=300, return_mode="median") * 1e3 / 8
        res[(O, D, name)] = (us, err)
        assert err < 4e-3, (O, D, name, err)
print(
    f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}: us per product (rel. err vs float64)"
)
print("| variant | " + " | ".join(f"{O}x{D}" for O, D in shapes) + " |")
print("|---|" + "---|" * len(shapes))
for name in variants:
    print(
        f"| {name} | "
        + " | ".join(f"{res[(O, D, name)][0]:.1f} ({res[(O, D, name)][1]:.0e})" for O, D in shapes)
        + " |"
    )
