"""Our int4 products for AVX2 CPUs (int4_avx2.c), compiled on the user's machine the first time they run.

PyTorch's CPU int4 operator (kernels/quant/cpu.py) converts every weight to float before multiplying
and, on a CPU without AVX-512, runs at about a third of the memory's speed: one-token products, which
should be bound by reading the weights, are bound by arithmetic. int4_avx2.c reads the operator's tiles
as they are and multiplies the 4-bit codes by the activations rounded to int8 in blocks of 32 (as
llama.cpp does), in integer multiply-adds: several times faster for a token, faster for prefill too.
The int8 rounding adds about 0.3% relative error to a product, against the ~10% that 4-bit weights
themselves carry.

The C file ships with the package and is compiled once with the system's C compiler ($CC, else cc or
gcc: the compiler Triton needs too) into the user's cache folder, named by a hash of the source and the
flags; a second start loads it. No compiler, a failed build, a CPU without AVX2 and FMA, or a tile
layout the kernel does not read: `library()` is None and the operator does the work (slower, same
results within rounding). `int4_backend()` says which in one line.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("int4_avx2.c")
FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")
ACTIVATION_BLOCK = 32
GROUPS = (32, 64, 128)  # the int4 group sizes the kernel reads (kernels/quant/naive.py's INT4_GROUP_SIZES)

_POINTER, _INT = ctypes.c_void_p, ctypes.c_int


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cache_folder() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("kimi-desk", appauthor=False)) / "kernels"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None where they cannot run here (see the module's text)."""
    why = _unavailable()
    if why is not None:
        _reasons.append(why)
        return None
    compiler = _compiler()
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join((compiler, *FLAGS)).encode()).hexdigest()[:16]
    target = cache_folder() / f"int4_avx2-{digest}-{platform.machine()}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as work:
                built = Path(work) / target.name
                result = subprocess.run(
                    [compiler, *FLAGS, "-o", str(built), str(SOURCE)], capture_output=True, text=True, timeout=300
                )
                if result.returncode != 0:
                    _reasons.append(f"the C compiler failed on int4_avx2.c: {result.stderr.strip()[:200]}")
                    return None
                os.replace(built, target)  # whole or absent: two processes building at once both succeed
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        _reasons.append(f"the int4 CPU kernels could not be built or loaded: {error}")
        return None
    if not lib.int4_cpu_supported():
        _reasons.append("this CPU lacks AVX2 or FMA")
        return None
    lib.int4_quantize_activations.argtypes = [_POINTER, _INT, _INT, _INT, _POINTER, _POINTER, _POINTER, _POINTER]
    lib.int4_linear_avx2.argtypes = [_POINTER, _POINTER, *[_INT] * 4, *[_POINTER] * 4, _INT, _POINTER, _INT]
    return lib


_reasons: list[str] = []


def _unavailable() -> str | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the int4 CPU kernels are for x86-64 (this is {platform.machine()})"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return "this CPU lacks AVX2"
    if _compiler() is None:
        return "no C compiler (cc or gcc) to build the int4 CPU kernels"
    return None


def int4_backend() -> str:
    """One line: which code multiplies int4 weights on this CPU, and why."""
    if library() is not None:
        return "int4 on the CPU: kimi-desk's AVX2 kernels (int8 activations)"
    return f"int4 on the CPU: PyTorch's operator ({_reasons[-1] if _reasons else 'kernels unavailable'})"


def reads(rows: int, split: bool, group: int, in_features: int, padded_rows: int) -> bool:
    """Whether the kernel reads tiles of this layout and shape: split layouts of 32 or 64 rows, whole
    tiles, groups of 32-128 inputs."""
    return (
        split
        and rows in (32, 64)
        and padded_rows % rows == 0
        and group in GROUPS
        and in_features % group == 0
        and library() is not None
    )


def int4_linear_avx2(
    x: torch.Tensor, tiles: torch.Tensor, scales_and_zeros: torch.Tensor, rows: int, group: int
) -> torch.Tensor:
    """x [M, D] (any float dtype) @ W^T -> [M, O'] float32 (O' = the tiles' padded rows), W in the CPU
    operator's tiles of `rows` rows with bf16 scales and zeros [D / group, O', 2]."""
    lib = library()
    x = x.to(torch.float32).contiguous()
    M, D = x.shape
    padded_rows = scales_and_zeros.shape[1]
    codes = torch.empty(M, D, dtype=torch.int8)
    act_scales = torch.empty(M, D // ACTIVATION_BLOCK)
    code_sums = torch.empty(M, D // ACTIVATION_BLOCK, dtype=torch.int32)
    sums = torch.empty(M, D // group)
    lib.int4_quantize_activations(
        x.data_ptr(), M, D, group, codes.data_ptr(), act_scales.data_ptr(), code_sums.data_ptr(), sums.data_ptr()
    )
    y = torch.empty(M, padded_rows)
    lib.int4_linear_avx2(
        tiles.data_ptr(),
        scales_and_zeros.data_ptr(),
        rows,
        D,
        padded_rows,
        group,
        codes.data_ptr(),
        act_scales.data_ptr(),
        code_sums.data_ptr(),
        sums.data_ptr(),
        M,
        y.data_ptr(),
        torch.get_num_threads(),
    )
    return y
