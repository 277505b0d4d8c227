"""Our C kernels for the CPU, compiled on the user's machine the first time they are needed.

PyTorch's CPU operators leave parts of a step far from what the memory allows on a CPU without
AVX-512, and a decode step's small operations cost more in dispatch than in arithmetic: the int4 and
int8 products (kernels/quant/avx2.c), a few rows against a bfloat16 weight (kernels/dense/bf16_cpu.c),
the few-row attention of a decode step over a long MLA cache (kernels/mla/attention_avx2.c), KDA's
decode step, some fifty small operations a layer (kernels/kda/decode_avx2.c), the MoE router's choice
(kernels/moe/router_cpu.c), the norms and the sampled token's choice. Those are written in C with AVX2
intrinsics, ship as source with the
package (with avx2_math.h, the vector math they share), and are compiled once with the system's C
compiler ($CC, else cc or gcc: the compiler Triton needs too) into the user's cache folder, named by a
hash of the source, the header and the flags; a later start loads the file. Only our own shipped
source is ever compiled.

No compiler, a failed build, or a CPU without AVX2 and FMA: `library()` is None and the caller keeps
PyTorch's operators (slower, the same results within rounding); `reason()` says why in one line.

The loaded functions are called as ctypes functions, through a thin wrapper that also notes each call
while a decode step is recorded (`recording`): engine/cpu_replay.py replays a CPU decode step from those
calls without the model's Python code around them.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from kimi_desk import environment

FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")
# Vector math the sources include ("../avx2_math.h"): part of every build's hash.
HEADERS = tuple(sorted(Path(__file__).parent.glob("*.h")))

_reasons: dict[Path, str] = {}


def compiler() -> str | None:
    for name in (environment.c_compiler(), "cc", "gcc"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def cache_folder() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("kimi-desk", appauthor=False)) / "kernels"


def _unavailable() -> str | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the CPU kernels are for x86-64 (this is {platform.machine()})"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return "this CPU lacks AVX2"
    if compiler() is None:
        return "no C compiler (cc or gcc) to build the CPU kernels"
    return None


class KernelFunction:
    """One exported function of a compiled kernel file, called like the ctypes function it wraps (whose
    argtypes and restype it passes through), and noted in the calls being recorded, if any (`recording`).
    A restype set to an int marks a function that returns a status: negative where it failed."""

    __slots__ = ("function", "returns_status")

    def __init__(self, function):
        object.__setattr__(self, "function", function)
        object.__setattr__(self, "returns_status", False)

    def __getattr__(self, name):
        return getattr(self.function, name)

    def __setattr__(self, name, value):
        if name == "restype":
            object.__setattr__(self, "returns_status", value in (ctypes.c_int, ctypes.c_long))
        setattr(self.function, name, value)

    def __call__(self, *args):
        calls = _recording.calls
        if calls is not None:
            calls.append(_RecordedCall(self.function, args, self.returns_status))
        return self.function(*args)


class KernelLibrary:
    """A compiled kernel file (ctypes.CDLL) whose functions are KernelFunctions."""

    def __init__(self, cdll: ctypes.CDLL):
        self._cdll = cdll

    def __getattr__(self, name):
        function = KernelFunction(getattr(self._cdll, name))
        setattr(self, name, function)  # found by plain attribute lookup from now on
        return function


class _RecordedCall:
    """A kernel call to make again with the same arguments (pointers into tensors that stay put)."""

    __slots__ = ("call", "returns_status", "name")

    def __init__(self, function, args, returns_status: bool):
        self.call = functools.partial(function, *args)
        self.returns_status = returns_status
        self.name = function.__name__

    def __call__(self) -> None:
        status = self.call()
        if self.returns_status and status < 0:
            raise MemoryError(f"the CPU kernel {self.name} failed (status {status}): out of memory?")


def count_at(count: int | torch.Tensor):
    """A pointer argument to a count a kernel reads when it runs: a fresh C long holding an int, or a
    one-element int64 tensor's memory (a recorded step's cache length, which changes between replays)."""
    return ctypes.byref(ctypes.c_long(count)) if isinstance(count, int) else count.data_ptr()


class _Recording(threading.local):
    calls: list | None = None


_recording = _Recording()


@contextlib.contextmanager
def recording(calls: list):
    """Within: every call of a compiled kernel function made by this thread is also appended to `calls`,
    as a callable that makes it again with the same arguments (engine/cpu_replay.py records a decode step
    so)."""
    outer, _recording.calls = _recording.calls, calls
    try:
        yield calls
    finally:
        _recording.calls = outer


@functools.cache
def library(source: Path) -> KernelLibrary | None:
    """The C file `source` compiled and loaded (built on first use, then read from the cache folder); None
    where it cannot run here. The file must export `int cpu_supported(void)`."""
    why = _unavailable()
    if why is not None:
        _reasons[source] = why
        return None
    cc = compiler()
    text = source.read_bytes() + b"".join(header.read_bytes() for header in HEADERS)
    digest = hashlib.sha256(text + " ".join((cc, *FLAGS)).encode()).hexdigest()[:16]
    target = cache_folder() / f"{source.stem}-{digest}-{platform.machine()}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as work:
                built = Path(work) / target.name
                result = subprocess.run(
                    [cc, *FLAGS, "-o", str(built), str(source)], capture_output=True, text=True, timeout=300
                )
                if result.returncode != 0:
                    _reasons[source] = f"the C compiler failed on {source.name}: {result.stderr.strip()[:200]}"
                    return None
                os.replace(built, target)  # whole or absent: two processes building at once both succeed
        lib = KernelLibrary(ctypes.CDLL(str(target)))
    except (OSError, subprocess.SubprocessError) as error:
        _reasons[source] = f"{source.name} could not be built or loaded: {error}"
        return None
    if not lib._cdll.cpu_supported():  # the raw function: never part of a recording
        _reasons[source] = "this CPU lacks AVX2 or FMA"
        return None
    return lib


def reason(source: Path) -> str | None:
    """Why `library(source)` is None, after it was asked; None when it loaded."""
    return None if library(source) is not None else _reasons.get(source, "unavailable")
