"""One routed expert of a decode token at the 48B shapes (hidden 2304, expert width 1024) on the CPU, in
each weight format through the operator the engine uses for it: bf16 `F.linear` (oneDNN), int8
`_weight_int8pack_mm` on codes as stored (kernels/quant/cpu.py `int8_linear_cpu`), int4 PyTorch's CPU
operator with w1 and w3 joined (`int4_expert_cpu`), each with the token in bf16 and in float32 (the
engine computes in float32 on CPUs without bf16 hardware; the bf16 format's float32 row is float32
weights). Which format a CPU-only machine should prefer when several fit depends on these rates, not
only on the bytes read. The experts rotate over a pool larger
than the CPU's caches, as a real token's experts come from RAM; medians of rounds; ms per expert and the
rate at which the expert's weight bytes are read.

    python packaging/bench/cpu/expert_formats.py [--threads 1,2] [--pool 48] [--rounds 5]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from kimi_desk.kernels.quant import quantize_int4_groups
from kimi_desk.kernels.quant.cpu import int4_expert_cpu, int8_linear_cpu, pack_int4_expert_for_cpu
from kimi_desk.kernels.quant.naive import quantize_int8_rows

D, I = 2304, 1024


def experts(fmt: str, pool: int, gen: torch.Generator, dtype: torch.dtype):
    made = []
    for _ in range(pool):
        mats = [torch.randn(*shape, generator=gen) * 0.02 for shape in ((I, D), (D, I), (I, D))]  # w1, w2, w3
        if fmt == "bf16":
            made.append(tuple(m.to(dtype) for m in mats))
        elif fmt == "int8":
            made.append(tuple(quantize_int8_rows(m) for m in mats))
        else:
            made.append(pack_int4_expert_for_cpu(*(quantize_int4_groups(m) for m in mats)))
    return made


def forward(fmt: str, x: torch.Tensor, expert) -> torch.Tensor:
    if fmt == "int4":
        return int4_expert_cpu(x, expert)
    if fmt == "int8":
        (q1, s1), (q2, s2), (q3, s3) = expert
        h = F.silu(int8_linear_cpu(x, q1, s1.float())) * int8_linear_cpu(x, q3, s3.float())
        return int8_linear_cpu(h, q2, s2.float())
    w1, w2, w3 = expert
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--pool", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    bytes_per_weight = {"bf16": 2.0, "int8": 1.0, "int4": 0.5}
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}")
    print("| format | token | threads | ms per expert | weight GB/s |\n|---|---|---:|---:|---:|")
    for fmt, dtype in ((f, d) for f in ("bf16", "int8", "int4") for d in (torch.bfloat16, torch.float32)):
        x = torch.randn(1, D, generator=gen).to(dtype)
        pool = experts(fmt, args.pool, gen, dtype)
        weight_bytes = dtype.itemsize if fmt == "bf16" else bytes_per_weight[fmt]
        token = str(dtype).removeprefix("torch.")
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            for e in pool[:4]:
                forward(fmt, x, e)
            rounds = []
            for _ in range(args.rounds):
                start = time.perf_counter()
                for e in pool:
                    forward(fmt, x, e)
                rounds.append((time.perf_counter() - start) / len(pool))
            ms = statistics.median(rounds) * 1e3
            gbs = 3 * D * I * weight_bytes / (ms / 1e3) / 1e9
            print(f"| {fmt if fmt != 'bf16' else token} | {token} | {threads} | {ms:.3f} | {gbs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
