"""From what a user asked for to a loaded assistant: the one place that decides which model, which
device and which weight format, for the command line and the app alike.

    path = resolve_model(model_option, session)           # --model, else the session's, else the demo model
    assistant = load_assistant(path, "auto", "auto", notice=print_line)

`notice` hears one line for each choice the user did not make explicitly (a format chosen because the
model would not fit otherwise; a quantized cache rebuilt). Refusals are one-line errors: ModelChoiceError
for a model that cannot be found, MemoryCheckError for one that cannot fit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kimi_desk.assets import ASSETS_DIR
from kimi_desk.engine.errors import UserError

DEMO_MODEL = ASSETS_DIR / "model"
NO_MODEL_MESSAGE = "no model: pass --model PATH (a folder with config.json, *.safetensors and tokenizer.json)"
QUANTIZE_CHOICES = ("auto", "none", "fp8", "int8", "int4")


class ModelChoiceError(UserError):
    """No model could be found where the user pointed, or none at all; the message says what to pass."""


def resolve_model(option: str | None, session=None) -> Path:
    """--model (a folder, or a hub repo id pulled before), else the model `session` was read with, else
    the embedded demo model."""
    from kimi_desk.engine.hub import resolve_model_reference

    if option:
        path = resolve_model_reference(option)  # a path as is; owner/name from the hub cache, offline
        if not (path / "config.json").is_file():
            raise ModelChoiceError(
                f"{option}: not a model folder (it needs config.json, *.safetensors and tokenizer.json)"
            )
        return path
    if session is not None and session.model_source:
        return _session_model(session)
    if (DEMO_MODEL / "config.json").is_file():
        return DEMO_MODEL
    raise ModelChoiceError(NO_MODEL_MESSAGE)


def _session_model(session) -> Path:
    """Where the model `session` was read with is on this machine: its recorded folder, or the embedded
    demo model when that is the one (a session imported from another installation records the other
    installation's path)."""
    from kimi_desk.engine.weights import checkpoint_fingerprint

    path = Path(session.model_source)
    if (path / "config.json").is_file():
        return path
    if (DEMO_MODEL / "config.json").is_file() and checkpoint_fingerprint(DEMO_MODEL) == session.model_fingerprint:
        return DEMO_MODEL
    shown = "".join(c if c.isprintable() else "?" for c in session.model_source)[:200]
    raise ModelChoiceError(
        f"session {session.id} was read with the model at {shown}, which is not on this "
        "machine; pass --model PATH (the same checkpoint)"
    )


def resolve_device(option: str | None) -> str:
    import torch

    if option in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if option == "cuda" and not torch.cuda.is_available():
        raise ModelChoiceError("--device cuda: no CUDA device is available here; use --device cpu")
    if option not in ("cpu", "cuda"):
        raise ModelChoiceError(f"--device must be auto, cpu or cuda, got {option!r}")
    return option


def choose_format(
    path: Path,
    device: str,
    requested: str | None,
    notice: Callable[[str], None] = lambda line: None,
    available_bytes: int | None = None,
) -> str | None:
    """Before anything is loaded: the weight format to load the model folder with (None: the checkpoint's
    dtype), or MemoryCheckError (one line, naming what would fit). `requested` "auto" takes the most
    faithful format that fits this device, saying so through `notice` when it is not the checkpoint's
    own; "none" never quantizes; a format is taken as asked."""
    from kimi_desk.engine.config import KimiLinearConfig
    from kimi_desk.engine.hub import model_display_name
    from kimi_desk.engine.memory import fitting_format

    if requested not in (None, *QUANTIZE_CHOICES):
        raise ModelChoiceError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {requested!r}")
    config = KimiLinearConfig.from_file(path / "config.json")
    quantize, why = fitting_format(
        config, device, requested, model_name=model_display_name(path), available_bytes=available_bytes
    )
    if why:
        notice(why)
    return quantize


def budgets(device: str, gpu_memory: str | None = None, cpu_memory: str | None = None) -> tuple[int | None, int | None]:
    """(GPU bytes, RAM bytes) the model may take: --gpu-memory and --cpu-memory as given (sizes such as
    24GiB or 16GB), else what the card has free and what RAM has available, each less a margin
    (engine/placement.py). None where this machine cannot tell (no GPU; no /proc)."""
    from kimi_desk.engine.memory import available_cpu_memory, cuda_free
    from kimi_desk.engine.placement import default_cpu_budget, default_gpu_budget, parse_size

    gpu = parse_size(gpu_memory, "--gpu-memory") if gpu_memory else None
    cpu = parse_size(cpu_memory, "--cpu-memory") if cpu_memory else None
    if gpu is None and device == "cuda":
        free = cuda_free()
        gpu = default_gpu_budget(free[0]) if free else None
    if cpu is None:
        cpu = default_cpu_budget(available_cpu_memory())
    return gpu, cpu


def choose_placement(
    path: Path,
    device: str,
    requested: str | None,
    notice: Callable[[str], None] = lambda line: None,
    gpu_memory: str | None = None,
    cpu_memory: str | None = None,
    *,
    gpu_budget: int | None = None,
    cpu_budget: int | None = None,
    home: Path | None = None,
):
    """Before anything is loaded: (weight format, placement or None). On the CPU, choose_format within
    the RAM budget. On a GPU, the plan of engine/placement.py within the budgets: `auto` takes the most
    faithful format that fits the GPU whole, else int4 with the routed experts that do not fit in RAM
    (the smallest in RAM and the fastest there); a format asked for is planned as asked. The GPU's
    experts are the most used ones where the data folder `home` (default: engine.session.data_home)
    holds this checkpoint's expert usage (engine/usage.py). The plan's line goes to `notice` when
    experts live in RAM. PlacementError (one line) when nothing fits."""
    from kimi_desk.engine.config import KimiLinearConfig
    from kimi_desk.engine.hub import model_display_name
    from kimi_desk.engine.memory import formats_for
    from kimi_desk.engine.placement import PlacementError, parse_size, plan_placement

    if requested not in (None, *QUANTIZE_CHOICES):
        raise ModelChoiceError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {requested!r}")
    gpu, cpu = budgets(device, gpu_memory, cpu_memory)
    gpu, cpu = gpu_budget if gpu_budget is not None else gpu, cpu_budget if cpu_budget is not None else cpu
    if device != "cuda" or gpu is None:
        # The model lives in RAM: the memory check's own reading of it, unless a budget was given.
        explicit = (
            cpu_budget if cpu_budget is not None else parse_size(cpu_memory, "--cpu-memory") if cpu_memory else None
        )
        return choose_format(Path(path), device, requested, notice, available_bytes=explicit), None
    config = KimiLinearConfig.from_file(Path(path) / "config.json")
    name = model_display_name(Path(path))
    usage = stored_usage(Path(path), config, notice, home)

    def plan(fmt):
        return plan_placement(
            config,
            config.dtype,
            fmt,
            gpu_budget=gpu,
            cpu_budget=cpu,
            model_name=name,
            usage=usage.per_layer() if usage else None,
            usage_tokens=usage.tokens if usage else None,
        )

    if requested == "auto":
        for fmt in formats_for(device):
            quantize = None if fmt == "none" else fmt
            try:
                placement = plan(quantize)
            except PlacementError:
                continue
            if not placement.offloaded:
                if quantize is not None:
                    notice(
                        f"{name} does not fit here in {config.dtype}; loading its large matrices in {quantize} "
                        f"(--quantize none refuses instead)"
                    )
                return quantize, placement
        quantize = "int4"
    else:
        quantize = None if requested in (None, "none") else requested
    placement = plan(quantize)
    if placement.offloaded:
        notice(placement.describe())
    return quantize, placement


def stored_usage(path: Path, config, notice: Callable[[str], None] = lambda line: None, home: Path | None = None):
    """The expert usage kept for the checkpoint at `path` (engine/usage.py), or None: none kept yet, or
    a damaged file (said through `notice`)."""
    from kimi_desk.engine.session import data_home
    from kimi_desk.engine.usage import read_usage
    from kimi_desk.engine.weights import checkpoint_fingerprint

    layers = config.moe_layers
    if not layers:
        return None
    usage = read_usage(home or data_home(), checkpoint_fingerprint(path), layers, config.num_experts, notice)
    return usage if usage is not None and usage.tokens > 0 else None


def load_assistant(
    path: Path,
    device: str | None = "auto",
    quantize: str | None = "auto",
    notice: Callable[[str], None] = lambda line: None,
    gpu_memory: str | None = None,
    cpu_memory: str | None = None,
    **options,
):
    """The model at `path` on `device` in the format and placement choose_placement takes within the
    memory budgets (--gpu-memory, --cpu-memory), with its tokenizer: an engine.session.Assistant. On
    the CPU it computes in memory.cpu_compute_dtype's choice unless `dtype` is given."""
    import torch

    from kimi_desk.engine.config import KimiLinearConfig
    from kimi_desk.engine.memory import cpu_compute_dtype
    from kimi_desk.engine.session import Assistant

    device = resolve_device(device)
    fmt, placement = choose_placement(Path(path), device, quantize, notice, gpu_memory, cpu_memory)
    if device == "cpu" and "dtype" not in options:
        config = KimiLinearConfig.from_file(Path(path) / "config.json")
        options["dtype"] = getattr(torch, cpu_compute_dtype(config, fmt, budgets("cpu", cpu_memory=cpu_memory)[1]))
    return Assistant.load(path, device=device, quantize=fmt, notice=notice, placement=placement, **options)
