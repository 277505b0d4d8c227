"""GPU check: a decode token's RAM experts read by the GPU kernel in place, from pinned host memory
(kernels/moe/streamed.py with `rows` into a pinned stack), against copying them to GPU slots first and
against the same stack in GPU memory; the 48B model's expert shapes, int4 tiles. Then InPlaceDecode's
gather into a bank (k experts, pinned to GPU) on a side stream.

For k chosen experts of a 256-expert stack (fresh ones every call, so that nothing is served from L2):
- in place: one kernel pair reading the pinned stack over PCIe,
- copied: k experts' tiles copied to slots (cudaMemcpyAsync from pinned memory), then the kernel pair,
- on GPU: the kernel pair on the stack in GPU memory (the roofline of the kernel itself),
each the median of CUDA-event timings; and the in-place result against the GPU-memory one (the same
kernel: equal) and against the PyTorch form, eagerly and replayed from a CUDA graph.

Run from the repo root on the device:
    source packaging/source_shim.sh && python3 packaging/bench/gpu_checks/experts_in_place.py
"""

import statistics

import torch

from kimi_desk.kernels.moe.naive import streamed_experts_torch
from kimi_desk.kernels.moe.streamed import gather_rows_triton, streamed_experts_triton
from kimi_desk.kernels.quant.cpu import cpu_int4_layout

D, I, GROUP, E = 2304, 1024, 32, 256


def stack(out_features: int, in_features: int, pin: bool):
    tiles = torch.randint(0, 256, (E, out_features, in_features // 2), dtype=torch.uint8)
    sz = torch.empty(E, in_features // GROUP, out_features, 2, dtype=torch.bfloat16)
    sz[..., 0].uniform_(0.002, 0.02)
    sz[..., 1].uniform_(-0.01, 0.01)
    return (tiles.pin_memory(), sz.pin_memory()) if pin else (tiles, sz)


def timed(fn, calls: int = 60) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(calls):
        start.record()
        fn(i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[5:])


def main() -> None:
    layout = cpu_int4_layout()
    print(torch.cuda.get_device_name(), "layout", layout)
    host = (stack(2 * I, D, True), stack(D, I, True))
    gpu = tuple(tuple(t.cuda() for t in pair) for pair in host)
    expert_bytes = sum(t[0].numel() * t.element_size() for pair in host for t in pair)
    x = torch.randn(1, D, device="cuda", dtype=torch.bfloat16)
    print(f"expert: {expert_bytes / 2**20:.2f} MiB (tiles and scales)")
    print("| k | in place ms | GB/s | copied ms | GB/s | on GPU ms |\n|---:|---:|---:|---:|---:|---:|")
    for k in (1, 2, 4, 8, 16):
        weights = torch.rand(k, device="cuda")
        order = torch.randperm(E)
        all_rows = [order[(i * k + torch.arange(k)) % E].cuda() for i in range(64)]
        slots = tuple(
            tuple(torch.empty((k, *t.shape[1:]), dtype=t.dtype, device="cuda") for t in pair) for pair in host
        )
        slot_rows = torch.arange(k, device="cuda")

        def in_place(i):
            streamed_experts_triton(x, *host, all_rows[i], weights, layout=layout)

        def copied(i):
            for s, r in enumerate(all_rows[i].tolist()):
                for pair, slot in zip(host, slots):
                    for t, u in zip(pair, slot):
                        u[s].copy_(t[r], non_blocking=True)
            streamed_experts_triton(x, *slots, slot_rows, weights, layout=layout)

        def on_gpu(i):
            streamed_experts_triton(x, *gpu, all_rows[i], weights, layout=layout)

        t_place, t_copy, t_gpu = timed(in_place), timed(copied), timed(on_gpu)
        gb = k * expert_bytes / 1e9
        print(
            f"| {k} | {t_place:.3f} | {gb / t_place * 1e3:.1f} | {t_copy:.3f} | {gb / t_copy * 1e3:.1f} | {t_gpu:.3f} |"
        )

    print("\n| k | gather into a bank ms | GB/s |\n|---:|---:|---:|")
    for k in (1, 2, 4, 8):
        bank = [torch.empty((8, *t.shape[1:]), dtype=t.dtype, device="cuda") for pair in host for t in pair]
        order = torch.randperm(E)
        all_rows = [order[(i * k + torch.arange(k)) % E].cuda() for i in range(64)]

        def gather(i):
            for t, b in zip([t for pair in host for t in pair], bank):
                gather_rows_triton(t, all_rows[i], b)

        t_gather = timed(gather)
        gather(63)
        torch.cuda.synchronize()
        print(f"| {k} | {t_gather:.3f} | {k * expert_bytes / 1e9 / t_gather * 1e3:.1f} |")
    got = bank[0][:k]
    assert torch.equal(got.cpu(), host[0][0][all_rows[63].cpu()]), "gather"

    # Correctness: in place = on GPU exactly; both against the PyTorch form; a CUDA graph's replay.
    rows = torch.tensor([3, -1, 200, 17, -1, 5, 255, 128], device="cuda")
    weights = torch.rand(8, device="cuda")
    a = streamed_experts_triton(x, *host, rows, weights, layout=layout)
    b = streamed_experts_triton(x, *gpu, rows, weights, layout=layout)
    ref = streamed_experts_torch(x.cpu(), *host, rows.cpu(), weights.cpu(), layout=layout)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        c = streamed_experts_triton(x, *host, rows, weights, layout=layout)
    rows.copy_(torch.tensor([9, 10, -1, -1, 100, 101, 102, 7], device="cuda"))
    graph.replay()
    ref2 = streamed_experts_torch(x.cpu(), *host, rows.cpu(), weights.cpu(), layout=layout)
    rel = lambda u, v: float((u.double().cpu() - v).norm() / v.norm())  # noqa: E731
    print(
        f"in place == on GPU: {torch.equal(a, b)}; rel err vs PyTorch: {rel(a, ref):.2e}; graph replay: {rel(c, ref2):.2e}"
    )


if __name__ == "__main__":
    main()
