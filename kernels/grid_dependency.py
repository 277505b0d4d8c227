"""The kernel side of programmatic dependent launch (kimi_desk.kernels.pdl): imported by the Triton kernel
modules only, so that `kimi_desk.kernels` itself imports without Triton."""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """First thing in a kernel launched with `**pdl_launch(...)`: it may have started while the previous
    kernel finishes; wait for that kernel's outputs, then let the next kernel start early in turn."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
