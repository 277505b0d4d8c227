"""Compute kernels: Triton on CUDA, PyTorch references and CPU paths everywhere else.

Importing this package must work on any machine: Triton modules are only imported when a CUDA tensor
asks for them.

KIMI_DESK_KERNELS=torch sends everything to PyTorch. KIMI_DESK_KERNELS=triton sends CPU tensors to the
Triton kernels too, which only runs under Triton's interpreter (TRITON_INTERPRET=1): tests use it to
run the GPU decode path, fused kernels and all, on the CPU.
"""

from kimi_desk import environment


def use_triton(tensor) -> bool:
    """Whether `tensor` should go to a Triton kernel (CUDA, unless forced one way or the other)."""
    forced = environment.forced_kernels()
    if forced == "torch":
        return False
    return tensor.is_cuda or forced == "triton"


def dot_operand_dtype(dtype):
    """The Triton dtype of a kernel's dot operands held as torch `dtype` (bf16, fp16 or fp32): the same.
    Triton's interpreter (3.9) computes bf16 dots wrongly, so there they take fp32 operands holding the
    same rounded values."""
    import torch
    import triton.language as tl

    if dtype == torch.float32 or environment.triton_interpreter():
        return tl.float32
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


_float32_copies = None  # a torch.utils.weak.WeakIdKeyDictionary, made at first use


def float32_of(tensor):
    """`tensor` in float32: itself where it is, else on the CPU a contiguous copy made once and kept while
    the tensor lives and is unchanged (its in-place version). A bfloat16 model's weights that a CPU step
    multiplies in float32 (routers, MLA's absorbed projections, KDA's small parameters) would otherwise
    be widened at every step, megabytes of copies each. On a GPU (memory scarcer, a widening one kernel
    of a recorded step) and where gradients flow through the tensor, a fresh copy."""
    global _float32_copies
    import torch

    if tensor.dtype == torch.float32:
        return tensor
    if tensor.device.type != "cpu" or (tensor.requires_grad and torch.is_grad_enabled()):
        return tensor.float()
    if _float32_copies is None:
        from torch.utils.weak import WeakIdKeyDictionary

        _float32_copies = WeakIdKeyDictionary()
    kept = _float32_copies.get(tensor)
    if kept is None or kept[0] != tensor._version:
        kept = _float32_copies[tensor] = (tensor._version, tensor.detach().float().contiguous())
    return kept[1]


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


_pdl_devices: dict = {}
_pdl_off = False  # set by without_pdl


def pdl(tensor) -> bool:
    """Whether Triton kernels working on `tensor` launch with programmatic dependent launch: a Hopper or
    newer GPU starts a kernel while the one before it finishes (its launch and setup overlap the earlier
    kernel's tail), and the kernel's `gdc_wait()` waits for the earlier kernel's outputs. Every kernel
    launched this way must call gdc_wait() before it reads or writes anything an earlier kernel touches
    (ours call it first thing: reading weights before it measured no faster, gpu_checks/pdl_chain.py).
    Off under Triton's interpreter, before compute capability 9.0, with KIMI_DESK_PDL=0 (read once per
    device) and inside `without_pdl()`."""
    if not tensor.is_cuda or _pdl_off:
        return False
    device = tensor.device.index if tensor.device.index is not None else 0
    if device not in _pdl_devices:
        import torch

        _pdl_devices[device] = (
            torch.cuda.get_device_capability(device)[0] >= 9 and environment.programmatic_dependent_launch()
        )
    return _pdl_devices[device]


def pdl_launch(tensor) -> dict:
    """The launch arguments of a kernel that starts with `if PDL: grid_dependency.wait_for_previous_kernel()`:
    `kernel[grid](..., **pdl_launch(x))`."""
    on = pdl(tensor)
    return {"PDL": on, "launch_pdl": on}


class without_pdl:
    """`with without_pdl():` launches the Triton kernels without programmatic dependent launch, for
    profiles: a kernel launched early counts its wait for the previous one in its own time."""

    def __enter__(self):
        global _pdl_off
        self._saved, _pdl_off = _pdl_off, True
        return self

    def __exit__(self, *exc):
        global _pdl_off
        _pdl_off = self._saved
        return False
