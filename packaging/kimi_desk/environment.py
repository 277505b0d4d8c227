"""Every environment variable kimi-desk reads, read here and nowhere else (README's table lists them).

Each is read when asked for, not at import, so that a test or a launcher may set it at any time. Unset
and empty mean the same: the default.
"""

from __future__ import annotations

import os

HOME = "KIMI_DESK_HOME"
DEBUG = "KIMI_DESK_DEBUG"
KERNELS = "KIMI_DESK_KERNELS"
CUDA_GRAPH = "KIMI_DESK_CUDA_GRAPH"
PDL = "KIMI_DESK_PDL"
THREADS = "KIMI_DESK_THREADS"
HUB_TIMEOUT = "KIMI_DESK_HUB_TIMEOUT"
SKIP_MEMORY_CHECK = "KIMI_DESK_SKIP_MEMORY_CHECK"
TRITON_INTERPRET = "TRITON_INTERPRET"
C_COMPILER = "CC"


def _text(name: str) -> str:
    return os.environ.get(name, "").strip()


def home() -> str | None:
    """KIMI_DESK_HOME: one folder for settings and sessions instead of the platform's."""
    return _text(HOME) or None


def debug() -> bool:
    """KIMI_DESK_DEBUG: an unexpected error prints its traceback."""
    return bool(_text(DEBUG))


def forced_kernels() -> str:
    """KIMI_DESK_KERNELS: `torch` forces the PyTorch kernels, `triton` the Triton ones ('' = choose)."""
    return _text(KERNELS).lower()


def cuda_graph() -> bool:
    """KIMI_DESK_CUDA_GRAPH=0: decode step by step, without recording CUDA graphs."""
    return _text(CUDA_GRAPH) != "0"


def programmatic_dependent_launch() -> bool:
    """KIMI_DESK_PDL=0: no programmatic dependent launch on Hopper GPUs."""
    return _text(PDL) != "0"


def thread_count() -> int | None:
    """KIMI_DESK_THREADS, else OMP_NUM_THREADS: a fixed count of CPU threads (a positive integer)."""
    for name in (THREADS, "OMP_NUM_THREADS"):
        value = _text(name)
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def hub_timeout_text() -> str:
    """KIMI_DESK_HUB_TIMEOUT: seconds a Hugging Face Hub request may wait (checked by engine/hub.py)."""
    return _text(HUB_TIMEOUT)


def skip_memory_check() -> bool:
    """KIMI_DESK_SKIP_MEMORY_CHECK=1: load even when the memory check says the model will not fit."""
    return _text(SKIP_MEMORY_CHECK) == "1"


def triton_interpreter() -> bool:
    """TRITON_INTERPRET=1 (Triton's own): Triton kernels run in its interpreter on the CPU."""
    return _text(TRITON_INTERPRET) == "1"


def hub_verbosity_set() -> bool:
    """HF_HUB_VERBOSITY (huggingface-hub's own): when unset, pulls quieten the library's warnings."""
    return bool(_text("HF_HUB_VERBOSITY"))


def c_compiler() -> str | None:
    """CC (the usual one): the C compiler that builds kimi-desk's CPU kernels (default: cc, else gcc)."""
    return _text(C_COMPILER) or None
