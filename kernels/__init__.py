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
