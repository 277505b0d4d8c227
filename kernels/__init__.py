"""Compute kernels: Triton on CUDA, PyTorch references and CPU paths everywhere else.

Importing this package must work on any machine: Triton modules are only imported when a CUDA tensor
asks for them.

KIMI_DESK_KERNELS=torch sends everything to PyTorch. KIMI_DESK_KERNELS=triton sends CPU tensors to the
Triton kernels too, which only runs under Triton's interpreter (TRITON_INTERPRET=1): tests use it to
run the GPU decode path, fused kernels and all, on the CPU.
"""

import os


def use_triton(tensor) -> bool:
    """Whether `tensor` should go to a Triton kernel (CUDA, unless forced one way or the other)."""
    forced = os.environ.get("KIMI_DESK_KERNELS", "").lower()
    if forced == "torch":
        return False
    return tensor.is_cuda or forced == "triton"


_zeroed_counters: dict = {}


def zeroed_counters(device, n: int):
    """An int32 tensor of at least n zeros on `device`, shared by the kernels whose last program to
    finish a block does its reduction (they count on it, and the last one puts its count back to zero).
    Kernels on one stream run one after another, so one tensor serves them all; two streams running such
    kernels at once would need their own."""
    import torch

    counters = _zeroed_counters.get(device)
    if counters is None or counters.numel() < n:
        counters = _zeroed_counters[device] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return counters
