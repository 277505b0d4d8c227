"""A checkpoint's quantized weights kept on disk, so that the next start reads them instead of
quantizing the full-precision checkpoint again (the 48B model: 98 GB of bf16 read and quantized, against
27 GB of int4 read).

One safetensors file per checkpoint and format, `<checkpoint>/.kimi-desk-cache/<format>.safetensors`
(or, where the checkpoint's folder cannot be written, the same name under the user's cache folder, in a
folder named by the checkpoint's fingerprint). It holds the quantized parameters (codes) and their
scales and zeros under the model's own names, in the layout of kernels/quant; the parameters that are
not quantized (norms, routers, gates' scalars) are still read from the checkpoint. Its metadata ties it
to the checkpoint's fingerprint, the format and the cache's version: a file that does not match (another
checkpoint, an older kimi-desk, a truncated or damaged file, a tensor of the wrong shape) is rebuilt,
and one line says so.

The file is written after the model is loaded, one tensor at a time (the header first, every shape
being known), to a temporary file beside it, then renamed into place: an interrupted write leaves no
half-written cache, only a temporary file that the next write removes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from kimi_desk.engine.memory import format_bytes
from kimi_desk.engine.quantize import format_of

# 2: under int4 the output head is int4 in groups of 32 (int8 before). 3: under int4 the attention's
# queries and keys and the dense MLP are int8.
CACHE_VERSION = "3"
FOLDER = ".kimi-desk-cache"
_DTYPES = {
    torch.float8_e4m3fn: "F8_E4M3",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
}
# Room left on the disk beyond the cache itself, so that writing it never fills the disk.
_SPARE_BYTES = 1 << 30


def quantized_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every quantized parameter and its scales and zeros, in the model's order. The
    routed experts of a layer split between GPU and RAM (engine/offload.py) are seen whole, under the
    stacked names: one cache serves every placement."""
    from kimi_desk.engine.offload import StackedRows

    for name, param in model.named_parameters():
        if format_of(param) is None or ".experts.in_ram." in name:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if ".experts.on_gpu." in name:
            split = model.get_submodule(owner_name.rpartition(".")[0])
            stacked = name.replace(".on_gpu.", ".")
            yield stacked, StackedRows(split, attr)
            for sidecar in ("scale", "zero"):
                if hasattr(owner, f"{attr}_{sidecar}"):
                    yield f"{stacked}_{sidecar}", StackedRows(split, f"{attr}_{sidecar}")
            continue
        yield name, param.data
        for sidecar in ("scale", "zero"):
            if hasattr(owner, f"{attr}_{sidecar}"):
                yield f"{name}_{sidecar}", owner.get_buffer(f"{attr}_{sidecar}")


def cache_file(checkpoint: Path, method: str, fingerprint: str) -> Path:
    """Where the cache of `checkpoint` in `method` lives: beside it if its folder can be written (and is
    not the embedded model inside the installed package), else in the user's cache folder."""
    from kimi_desk.assets import ASSETS_DIR

    checkpoint = Path(checkpoint).resolve()
    beside = checkpoint / FOLDER
    writable = os.access(checkpoint, os.W_OK) and (not beside.exists() or os.access(beside, os.W_OK))
    if writable and not checkpoint.is_relative_to(Path(ASSETS_DIR).resolve()):
        return beside / f"{method}.safetensors"
    import platformdirs

    return (
        Path(platformdirs.user_cache_dir("kimi-desk", appauthor=False))
        / "quantized"
        / fingerprint
        / f"{method}.safetensors"
    )


def _metadata(method: str, fingerprint: str) -> dict[str, str]:
    return {"kimi_desk_quantized": CACHE_VERSION, "format": method, "checkpoint_fingerprint": fingerprint}


def load_cached(
    model: torch.nn.Module, path: Path, method: str, fingerprint: str, notice: Callable[[str], None]
) -> bool:
    """Fill the model's quantized tensors from the cache at `path`; False (and a line through `notice`
    when a file was there) if it is missing or does not match, the model then left to be loaded from
    the checkpoint."""
    if not path.is_file():
        return False
    wanted = dict(quantized_tensors(model))
    try:
        with safe_open(path, framework="pt", device="cpu") as reader:
            if (reader.metadata() or {}) != _metadata(method, fingerprint):
                notice(f"the quantized cache {path} is for another checkpoint or kimi-desk version; quantizing again")
                return False
            if set(reader.keys()) != set(wanted):
                notice(f"the quantized cache {path} does not hold this model's tensors; quantizing again")
                return False
            for name, target in wanted.items():
                piece = reader.get_slice(name)
                if tuple(piece.get_shape()) != tuple(target.shape) or piece.get_dtype() != _DTYPES[target.dtype]:
                    notice(f"the quantized cache {path} has {name} of another shape; quantizing again")
                    return False
                target.copy_(reader.get_tensor(name))
    except (SafetensorError, OSError, ValueError) as exc:
        notice(f"the quantized cache {path} is damaged ({str(exc).splitlines()[0][:80]}); quantizing again")
        return False
    return True


def safetensors_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]):
    """(the bytes a safetensors file starts with, the size of the data after them) for tensors written
    one after another in `entries`' order, so that a writer can stream them without holding them all."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in entries:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(encoded)) + encoded, offset


def write_cache(
    model: torch.nn.Module, path: Path, method: str, fingerprint: str, notice: Callable[[str], None]
) -> None:
    """Write the model's quantized tensors as the cache at `path`, one tensor at a time; a disk that
    cannot take it costs the cache (said through `notice`), never the loaded model."""
    tensors = list(quantized_tensors(model))
    encoded, offset = safetensors_header(
        [(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in tensors], _metadata(method, fingerprint)
    )
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        import shutil

        free = shutil.disk_usage(path.parent).free
        if offset + _SPARE_BYTES > free:
            notice(
                f"not keeping a quantized cache: it needs {format_bytes(offset)} and {path.parent} has "
                f"{format_bytes(free)} free (the next start quantizes again)"
            )
            return
        with open(temporary, "xb") as fh:
            fh.write(encoded)
            for _, tensor in tensors:
                fh.write(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        notice(f"could not keep a quantized cache at {path} ({exc.strerror or exc}); the next start quantizes again")
