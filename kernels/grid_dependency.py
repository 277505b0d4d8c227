"""The kernel side of programmatic dependent launch (kimi_desk.kernels.pdl): imported by the Triton kernel
modules only, so that `kimi_desk.kernels` itself imports without Triton."""

import triton
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def wait_for_previous_kernel():
    """First thing in a kernel launched with `**pdl_launch(...)`, as `if PDL: wait_for_previous_kernel()`: it
    may have started while the previous kernel finishes; wait for that kernel's outputs, then let the next
    kernel start early in turn. The call sits under the kernel's own `if PDL:` because Triton's
    interpreter (the CPU tests) pays some milliseconds for every call of a jitted function, in every
    program, even one that does nothing."""
    gdc_wait()
    gdc_launch_dependents()
