"""What a model needs in memory, what the machine has, and which weight format fits.

    estimate = estimate_memory(config, "bfloat16", "int4")        # bytes, counted on the meta device
    check_memory(config, "cuda", quantize="int4")                 # MemoryCheckError when it would not fit
    quantize, why = fitting_format(config, "cuda", "auto")        # the best format that fits, and why

Weights are counted parameter by parameter with engine/quantize.py's rule, so the estimate follows the
formats exactly; the working set is the KDA state (and the copy a chat turn branches from), the MLA
cache for the context (sessions size it once for the document and its thread, so it never grows
geometrically), one prefill chunk's activations, and the runtime. On a GPU the budget is the card's free memory; on the CPU, MemAvailable
lowered to the container's limit.
"""

from __future__ import annotations

from pathlib import Path

from kimi_desk import environment
from kimi_desk.engine.config import KimiLinearConfig
from kimi_desk.engine.errors import UserError


class MemoryCheckError(UserError):
    """The model would not fit in the memory of the device it is about to be loaded on. One line."""


_BYTES_PER_DTYPE = {"float32": 4, "bfloat16": 2, "float16": 2}
# A long book or a mid-sized codebase; the MLA cache allowance is for this many tokens.
DEFAULT_CONTEXT_TOKENS = 131_072
# The Python process, torch's own allocations, the tokenizer.
RUNTIME_OVERHEAD_BYTES = 512 << 20
# Memory sizes of common GPUs as they are sold (GB), to say which one a model would fit on.
GPU_SIZES_GB = (8, 12, 16, 24, 32, 40, 48, 80, 96, 141, 192)
# Formats from the most faithful to the smallest: `auto` takes the first that fits.
FORMATS = ("none", "fp8", "int8", "int4")


def _dtype_name(dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _BYTES_PER_DTYPE:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    return name


def weight_bytes(name: str, shape: tuple[int, ...], method: str | None, compute_bytes: int) -> float:
    """Bytes one parameter takes: its codes and scales in its format (quantize.py's rule), float32
    where the engine keeps float32, else the compute dtype."""
    from kimi_desk.engine.quantize import int4_group, weight_format
    from kimi_desk.engine.weights import FP32_PARAMETERS

    numel = 1
    for size in shape:
        numel *= size
    fmt = weight_format(name, method)
    rows = numel // shape[-1]
    if fmt == "int4":
        return numel / 2 + numel / (int4_group(name, shape[-1]) or 32) * 4
    if fmt is not None:
        return numel + rows * 4
    return numel * (4 if name.endswith(FP32_PARAMETERS) else compute_bytes)


def mla_cache_dtype(config: KimiLinearConfig, dtype, quantize: str | None, device: str = "cpu") -> str:
    """The dtype of the MLA caches: the checkpoint's half precision for quantized weights computed in
    float32 on a CPU (one without bf16 hardware), else the activations'. A long context's cache is what
    grows with it (the 48B model at 128k tokens: 2.1 GB in float32) and what a session's snapshot holds:
    in half precision both halve, and its rounding is far below the quantized weights' error.
    Unquantized, the cache stays float32, so that the model stays exact."""
    name = _dtype_name(dtype)
    if quantize and device == "cpu" and name == "float32" and config.dtype in ("bfloat16", "float16"):
        return config.dtype
    return name


def estimate_memory(
    config: KimiLinearConfig,
    dtype,
    quantize: str | None = None,
    *,
    context_tokens: int | None = None,
    prefill_chunk: int = 2048,
) -> dict:
    """Bytes the model needs at batch 1 (see the module doc): weights, KDA state, MLA cache, activations."""
    import torch  # noqa: F401 - build_on_meta needs it; imported here so that importing stays light

    from kimi_desk.engine.quantize import METHODS
    from kimi_desk.engine.weights import build_on_meta

    dtype_name = _dtype_name(dtype)
    compute_bytes = _BYTES_PER_DTYPE[dtype_name]
    if quantize is not None and quantize not in METHODS:
        raise ValueError(f"quantize must be one of {', '.join(METHODS)}, got {quantize!r}")
    model = build_on_meta(config)
    parameters, weights = 0, 0.0
    for name, param in model.named_parameters():
        parameters += param.numel()
        weights += weight_bytes(name, tuple(param.shape), quantize, compute_bytes)
    kinds = config.layer_kinds
    kda_layers, mla_layers = kinds.count("kda"), kinds.count("mla")
    projection = config.kda_projection_size
    kda_state = (
        kda_layers
        * (
            config.kda_num_heads * config.kda_head_dim**2 * 4
            + 3 * projection * (config.short_conv_kernel_size - 1) * compute_bytes
        )
        * 2
    )
    if context_tokens is None:
        context_tokens = min(config.model_max_length, DEFAULT_CONTEXT_TOKENS)
    cache_bytes = _BYTES_PER_DTYPE[mla_cache_dtype(config, dtype_name, quantize)]
    mla_cache = mla_layers * context_tokens * config.mla_latent_size * cache_bytes
    # fp32 intermediates of one prefill chunk: a few dozen vectors of the widest layer per token, plus
    # the routed experts' and the dense MLP's hidden activations. A rough allowance, not a measurement.
    widest = max(config.hidden_size, projection)
    per_token = (
        24 * widest + 3 * config.num_experts_per_token * config.moe_intermediate_size + 3 * config.intermediate_size
    )
    activations = prefill_chunk * per_token * 4 + RUNTIME_OVERHEAD_BYTES
    weights = int(weights)
    return {
        "parameters": parameters,
        "dtype": dtype_name,
        "quantize": quantize,
        "weights_bytes": weights,
        "kda_state_bytes": kda_state,
        "mla_cache_bytes": mla_cache,
        "context_tokens": context_tokens,
        "activations_bytes": activations,
        "total_bytes": weights + kda_state + mla_cache + activations,
    }


def format_bytes(n: float) -> str:
    """Sizes in the one unit system kimi-desk writes everywhere: powers of 1024, named MiB and GiB."""
    if n >= 10 * 2**30:
        return f"{n / 2**30:.0f} GiB"
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.0f} MiB"


def _cgroup_room() -> int | None:
    """Bytes this process's cgroup may still allocate (containers), when it is limited."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # cgroup v1 writes a huge number for "no limit"
            return max(int(limit) - usage, 0)
    return None


def available_cpu_memory() -> int | None:
    """MemAvailable of /proc/meminfo (what can be allocated without swapping), lowered to the cgroup's
    limit; None where there is no /proc (macOS, Windows): the check is then skipped."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
            else:
                return None
    except (OSError, ValueError, IndexError):
        return None
    room = _cgroup_room()
    return available if room is None else min(available, room)


def cuda_free(index: int | None = None) -> tuple[int, str] | None:
    """(free bytes, a name for the card) of a CUDA device, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device() if index is None else index
    free, _total = torch.cuda.mem_get_info(index)
    return free, f"GPU {index} ({torch.cuda.get_device_name(index)})"


def _smallest_gpu(total_bytes: float) -> int | None:
    return next((gb for gb in GPU_SIZES_GB if gb * 1e9 >= total_bytes), None)


def formats_for(device: str) -> tuple[str, ...]:
    """The formats `device` runs, most faithful first: fp8 needs a GPU of compute capability 8.9 or
    later (Ada, Hopper); the CPU has no fp8 arithmetic and takes int8 and int4 instead."""
    import torch

    if device == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        return FORMATS
    return tuple(f for f in FORMATS if f != "fp8")


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX), so that PyTorch's bf16
    products run at least as fast as float32's. Without those instructions (AVX2 desktops, most laptops,
    ARM) PyTorch emulates bf16 products, several times slower than float32's (BENCHMARKS.md, issue 16)."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def cpu_compute_dtype(
    config: KimiLinearConfig, quantize: str | None, available_bytes: int | None, fast_bf16: bool | None = None
) -> str:
    """The dtype the model computes in on this CPU: float32 where the CPU lacks bf16 hardware
    (cpu_has_fast_bf16) and the model fits `available_bytes` in float32 (the quantized matrices keep
    their codes; the rest doubles), else the checkpoint's. Half precision there only saves memory."""
    half = config.dtype in ("bfloat16", "float16")
    fast_bf16 = cpu_has_fast_bf16() if fast_bf16 is None else fast_bf16
    if not half or (fast_bf16 and config.dtype == "bfloat16"):
        return config.dtype
    needs = estimate_memory(config, "float32", quantize)["total_bytes"]
    return "float32" if available_bytes is None or needs <= available_bytes else config.dtype


def _available(device: str, available_bytes: int | None) -> tuple[int | None, str]:
    import torch

    if torch.device(device).type == "cuda":
        cuda = cuda_free(torch.device(device).index)
        where = cuda[1] if cuda else "this GPU"
        return (available_bytes if available_bytes is not None else cuda[0] if cuda else None), where
    return (available_bytes if available_bytes is not None else available_cpu_memory()), "this machine"


def check_memory(
    config: KimiLinearConfig,
    device="cpu",
    dtype=None,
    *,
    quantize: str | None = None,
    model_name: str | None = None,
    context_tokens: int | None = None,
    available_bytes: int | None = None,
) -> dict:
    """Raise MemoryCheckError when the model would not fit on `device` in `quantize`, saying what would;
    else return `estimate_memory`'s dict plus `available_bytes` (None when this machine cannot tell,
    then nothing is refused). `dtype` defaults to the checkpoint's. KIMI_DESK_SKIP_MEMORY_CHECK=1 skips
    the refusal (swap, or memory the estimate does not see)."""
    dtype = dtype if dtype is not None else config.dtype
    estimate = estimate_memory(config, dtype, quantize, context_tokens=context_tokens)
    available_bytes, where = _available(device, available_bytes)
    estimate["available_bytes"] = available_bytes
    total = estimate["total_bytes"]
    if available_bytes is None or total <= available_bytes or environment.skip_memory_check():
        return estimate
    count = estimate["parameters"]
    name = model_name or (
        f"This model ({count / 1e9:.1f}B parameters)" if count >= 1e9 else f"This model ({count / 1e6:.0f}M parameters)"
    )
    weights = f"{quantize} weights" if quantize else estimate["dtype"]
    message = (
        f"{name} needs about {format_bytes(total)} in {weights} ({format_bytes(estimate['weights_bytes'])} "
        f"of weights); {where} has {format_bytes(available_bytes)} available."
    )
    message += " " + _what_would_fit(config, dtype, device, context_tokens, available_bytes, quantize)
    message += " Set KIMI_DESK_SKIP_MEMORY_CHECK=1 to try anyway."
    raise MemoryCheckError(message)


def _what_would_fit(config, dtype, device, context_tokens, available_bytes, quantize) -> str:
    """The advice of a refusal: the smallest format that fits here, else where the smallest would fit."""
    import torch

    totals = {
        f: estimate_memory(config, dtype, None if f == "none" else f, context_tokens=context_tokens)["total_bytes"]
        for f in formats_for(str(torch.device(device).type))
    }
    requested = quantize or "none"
    smaller = [f for f in FORMATS if f in totals and totals[f] < totals.get(requested, float("inf"))]
    fitting = [f for f in smaller if totals[f] <= available_bytes]
    if fitting:
        return f"With --quantize {fitting[0]} it needs about {format_bytes(totals[fitting[0]])}, which fits here."
    smallest = min(totals, key=totals.get)
    gpu_free = cuda_free() if torch.device(device).type == "cpu" else None
    if gpu_free is not None and totals[requested if requested in totals else smallest] <= gpu_free[0]:
        return f"It fits on {gpu_free[1]}, which has {format_bytes(gpu_free[0])} free: use --device cuda."
    gpu = _smallest_gpu(totals[smallest])
    where = f"a GPU sold as {gpu} GB" if gpu else "no single GPU"
    return (
        f"Its smallest format, --quantize {smallest}, needs about {format_bytes(totals[smallest])}: "
        f"{where}, or a machine with that much free memory."
    )


def fitting_format(
    config: KimiLinearConfig,
    device: str,
    requested: str | None,
    *,
    model_name: str | None = None,
    available_bytes: int | None = None,
) -> tuple[str | None, str | None]:
    """The format to load with, and a line saying why when `auto` chose a smaller one than the
    checkpoint's dtype (None when nothing needs saying). `requested`: "auto", "none" (or None), or a
    format, which is taken as asked after the memory check. MemoryCheckError when nothing fits."""
    if requested not in ("auto",):
        quantize = None if requested in (None, "none") else requested
        check_memory(config, device, quantize=quantize, model_name=model_name, available_bytes=available_bytes)
        return quantize, None
    refusal = None
    for fmt in formats_for(device):
        quantize = None if fmt == "none" else fmt
        try:
            estimate = check_memory(
                config, device, quantize=quantize, model_name=model_name, available_bytes=available_bytes
            )
        except MemoryCheckError as too_big:
            refusal = refusal or too_big
            continue
        if quantize is None:
            return None, None
        name = model_name or "the model"
        return quantize, (
            f"{name} does not fit here in {config.dtype}; loading its large matrices in {quantize} "
            f"(about {format_bytes(estimate['total_bytes'])} in all; --quantize none refuses instead)"
        )
    raise refusal
