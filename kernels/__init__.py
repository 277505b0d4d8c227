"""Compute kernels: Triton on CUDA, PyTorch references and CPU paths everywhere else.

Importing this package must work on any machine: Triton modules are only imported when a CUDA tensor
asks for them.
"""

import os


def use_triton(tensor) -> bool:
    """Whether `tensor` should go to a Triton kernel (CUDA, and not forced to PyTorch)."""
    if os.environ.get("KIMI_DESK_KERNELS", "").lower() == "torch":
        return False
    return tensor.is_cuda
