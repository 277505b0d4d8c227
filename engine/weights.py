"""Checkpoints in the official Hugging Face layout: the name table, strict loading, writing.

A checkpoint folder holds config.json and either model.safetensors or shards listed in
model.safetensors.index.json, with the tensor names of kimi-linear-spec.md §2. Loading builds the
model on the meta device, then fills every parameter from memory-mapped safetensors: a missing,
unexpected or mis-shaped tensor is an error that names it. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from kimi_desk.engine.config import KimiLinearConfig
from kimi_desk.engine.errors import CheckpointError, ConfigError
from kimi_desk.engine.files import brief, first_line, index_shards, is_count, shown_name, some
from kimi_desk.engine.memory import mla_cache_dtype
from kimi_desk.engine.model import KimiLinearForCausalLM
from kimi_desk.engine.quantize import Int8Embedding, format_of, quantize_into, quantize_structure
from kimi_desk.engine.quantized_cache import cache_file, load_cached, write_cache

# Parameters kept in float32 whatever the model dtype: the gates' scalars and the short convolutions
# (as the reference implementations allocate them), the router's selection bias, and the router, whose
# scores choose the experts (2.4 MB a layer at the 48B shapes): held in float32 it is not converted again
# at every step. MLA's kv_b_proj keeps the model's dtype: the decode's kernels around the attention read
# it as stored, in float32 sums (kernels/mla: Triton on a GPU, C on the CPU), half the bytes a float32
# copy would make them read every step.
FP32_PARAMETERS = (
    "A_log",
    "dt_bias",
    "conv1d.weight",
    "e_score_correction_bias",
    "block_sparse_moe.gate.weight",
)

_EXPERT_PREFIX = "block_sparse_moe.experts."

# A safetensors header lists each tensor in about 130 bytes: the 48B model's largest shard needs under
# 200 KB, a whole 48B model in one file 3 MB. safetensors itself refuses headers over 100 MB; a header
# is parsed into Python objects several times its size, so the loader stops well before that.
HEADER_MAX_BYTES = 16 << 20
# The floating-point dtypes a checkpoint tensor may have (safetensors' names) and their sizes in bytes.
FLOAT_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_DIMS = 8


def checkpoint_to_parameter(name: str) -> tuple[str, int | None]:
    """The one name table: a checkpoint tensor name -> (our parameter name, expert index or None).

    Every name maps to itself, except the routed experts `...experts.{j}.w{1,2,3}.weight`, which live
    stacked in `...experts.w{1,2,3}` at index j.
    """
    if _EXPERT_PREFIX in name and name.endswith(".weight"):
        head, tail = name.split(_EXPERT_PREFIX, 1)
        parts = tail.split(".")
        if len(parts) == 3 and parts[0].isdigit() and parts[1] in ("w1", "w2", "w3"):
            return f"{head}{_EXPERT_PREFIX}{parts[1]}", int(parts[0])
    return name, None


def _is_stacked(pname: str) -> bool:
    """Whether parameter `pname` stacks the routed experts (one checkpoint tensor per expert)."""
    return pname.startswith("model.layers.") and ".experts.w" in pname


def _expert_tensor_name(pname: str, index: int) -> str:
    head, proj = pname.rsplit(".", 1)
    return f"{head}.{index}.{proj}.weight"


def _iter_expected(model: KimiLinearForCausalLM):
    """(checkpoint name, parameter name, expert index, shape) of every tensor the model needs, in order."""
    for pname, param in model.named_parameters():
        if _is_stacked(pname):
            for j in range(param.shape[0]):
                yield _expert_tensor_name(pname, j), pname, j, tuple(param.shape[1:])
        else:
            yield pname, pname, None, tuple(param.shape)


def expected_tensors(model: KimiLinearForCausalLM) -> dict[str, tuple[str, int | None, tuple[int, ...]]]:
    """Checkpoint name -> (parameter name, expert index, shape), for every tensor the model needs."""
    return {name: (pname, index, shape) for name, pname, index, shape in _iter_expected(model)}


def build_on_meta(config: KimiLinearConfig) -> KimiLinearForCausalLM:
    with torch.device("meta"):
        return KimiLinearForCausalLM(config)


def materialize(model: KimiLinearForCausalLM, device, dtype: torch.dtype) -> None:
    """Give every meta parameter real (uninitialised) storage: model dtype, or fp32 where it must be, or
    the codes' dtype where quantize_structure made it so; and the meta buffers (quantization scales)
    too. The routed experts a placement keeps in RAM (engine/offload.py) go to the CPU."""

    def device_of(name: str):
        return torch.device("cpu") if ".experts.in_ram." in name else device

    for module in model.modules():
        if isinstance(module, Int8Embedding):
            module.dtype = dtype
    for pname, param in list(model.named_parameters()):
        owner_name, _, attr = pname.rpartition(".")
        owner = model.get_submodule(owner_name)
        if format_of(param) is not None:
            want = param.dtype
        else:
            want = torch.float32 if pname.endswith(FP32_PARAMETERS) else dtype
        setattr(
            owner,
            attr,
            torch.nn.Parameter(torch.empty(param.shape, dtype=want, device=device_of(pname)), requires_grad=False),
        )
    for bname, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            owner_name, _, attr = bname.rpartition(".")
            model.get_submodule(owner_name).register_buffer(
                attr, torch.empty(buffer.shape, dtype=buffer.dtype, device=device_of(bname))
            )


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.exists():
        files = index_shards(index)
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise CheckpointError(f"{path}: shard {missing[0]} listed in model.safetensors.index.json is missing")
        return [path / f for f in files]
    if single.is_file():
        return [single]
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def read_header(file: Path) -> dict[str, dict]:
    """A safetensors file's tensors as its header lists them: name -> {"dtype": str, "shape": [int],
    "data_offsets": [begin, end]}, checked before anything is allocated for them. The header's length is
    bounded (HEADER_MAX_BYTES), every entry has the fields and types safetensors defines, and every
    tensor of a known dtype lies inside the file and spans exactly its shape's bytes: whatever the
    loader allocates for a tensor, the file holds. Anything else is a CheckpointError naming the file."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{file}: truncated or not a safetensors file")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > HEADER_MAX_BYTES:
                raise CheckpointError(
                    f"{file}: damaged or not a safetensors file (its header claims "
                    f"{header_len:,} bytes, a checkpoint's has at most {HEADER_MAX_BYTES:,})"
                )
            if header_len > size - 8:
                raise CheckpointError(f"{file}: truncated or not a safetensors file (header runs past the end)")
            text = fh.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot be read ({first_line(exc)})") from None
    try:
        header = json.loads(text)
    except (ValueError, RecursionError):
        raise CheckpointError(f"{file}: damaged safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: damaged safetensors header (not a JSON object)")
    data_size = size - 8 - header_len
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        problem = _header_entry_problem(entry, data_size)
        if problem:
            raise CheckpointError(f"{file}: damaged safetensors header (tensor {shown_name(name)} {problem})")
        tensors[name] = entry
    return tensors


def _header_entry_problem(entry, data_size: int) -> str | None:
    """What is wrong with one tensor's header entry, or None."""
    if not isinstance(entry, dict):
        return f"is {brief(entry)}, not an object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        return f"has dtype {brief(dtype)}"
    if not (isinstance(shape, list) and len(shape) <= _MAX_DIMS and all(is_count(d) for d in shape)):
        return f"has shape {brief(shape)}, not a list of at most {_MAX_DIMS} sizes"
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(is_count(o) for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        return f"has data_offsets {brief(offsets)}, not [begin, end]"
    if offsets[1] > data_size:
        return f"ends past the {data_size:,} bytes of data in the file: truncated"
    if dtype in FLOAT_DTYPE_BYTES and math.prod(shape) * FLOAT_DTYPE_BYTES[dtype] != offsets[1] - offsets[0]:
        return f"spans {offsets[1] - offsets[0]:,} bytes, not the size of its shape in {dtype}"
    return None


def check_tensors(model: KimiLinearForCausalLM, folder: Path, headers: dict[Path, dict[str, dict]]) -> None:
    """The headers (read_header's, per file) list every tensor `model` needs once, with its shape and a
    floating-point dtype, and nothing else. Checked on the model built on the meta device, before memory
    is allocated for it: a config.json that does not describe its weights is refused without allocating
    the model it describes."""
    params = dict(model.named_parameters())
    seen: set[str] = set()
    for file, header in headers.items():
        for name, entry in header.items():
            pname, index = checkpoint_to_parameter(name)
            param = params.get(pname)
            if (
                param is None
                or _is_stacked(pname) != (index is not None)
                or (index is not None and (index >= param.shape[0] or _expert_tensor_name(pname, index) != name))
            ):
                raise CheckpointError(f"{file.name}: unexpected tensor {shown_name(name)}")
            if name in seen:
                raise CheckpointError(f"{file.name}: tensor {name} appears twice in the checkpoint")
            shape = tuple(param.shape if index is None else param.shape[1:])
            if tuple(entry["shape"]) != shape:
                raise CheckpointError(
                    f"{file.name}: tensor {name} has shape {some(entry['shape'])}, expected {list(shape)}"
                )
            if entry["dtype"] not in FLOAT_DTYPE_BYTES:
                raise CheckpointError(
                    f"{file.name}: tensor {name} has dtype {brief(entry['dtype'])}, expected floating point"
                )
            seen.add(name)
    needed = sum(p.shape[0] if _is_stacked(n) else 1 for n, p in params.items())
    if len(seen) < needed:
        first = next(name for name, *_ in _iter_expected(model) if name not in seen)
        more = f" (and {needed - len(seen) - 1} more)" if needed - len(seen) > 1 else ""
        raise CheckpointError(f"{folder}: missing tensor {first}{more}")


def load_weights(
    model: KimiLinearForCausalLM, headers: dict[Path, dict[str, dict]], quantized_loaded: bool = False
) -> None:
    """Fill `model`'s materialized parameters from the files of `headers`, which check_tensors passed,
    quantizing as they are read; with `quantized_loaded` the quantized ones are already filled (from
    the disk cache) and not read."""
    from kimi_desk.engine.offload import expert_tensor

    params = dict(model.named_parameters())
    for file, header in headers.items():
        try:
            with safe_open(file, framework="pt", device="cpu") as reader:
                for name in header:
                    pname, index = checkpoint_to_parameter(name)
                    if pname not in params:  # an expert of a layer split between GPU and RAM
                        pname, index = expert_tensor(model, pname, index)
                    quantized = format_of(params[pname]) is not None
                    if quantized and quantized_loaded:
                        continue
                    tensor = reader.get_tensor(name)
                    if quantized:
                        # Quantized as read, on the target device: the full-precision model never exists.
                        quantize_into(model, pname, index, tensor)
                    else:
                        (params[pname].data if index is None else params[pname].data[index]).copy_(tensor)
        except SafetensorError as exc:
            raise CheckpointError(f"{file}: cannot read safetensors ({first_line(exc)})") from None


def checkpoint_fingerprint(path: Path) -> str:
    """Identifies a checkpoint cheaply: config.json, every safetensors header (names, shapes, dtypes,
    offsets) and the first and last MiB of each file's tensor data. Two checkpoints of one architecture
    but different weights differ in those bytes; reading them costs milliseconds at any model size."""
    digest = hashlib.sha256()
    digest.update((path / "config.json").read_bytes())
    for file in checkpoint_files(path):
        size = file.stat().st_size
        with open(file, "rb") as fh:
            digest.update(file.name.encode())
            digest.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            digest.update(fh.read(1 << 20))
    return digest.hexdigest()[:32]


def load_model(
    path,
    device="cpu",
    dtype: torch.dtype | None = None,
    quantize: str | None = None,
    notice: Callable[[str], None] = lambda line: None,
    placement=None,
) -> KimiLinearForCausalLM:
    """A checkpoint folder in the official layout -> a ready model in eval mode.

    `dtype` defaults to the checkpoint's (config.json `dtype`), float32 on a CPU that would be slow in
    half precision is the caller's choice. `quantize` ("fp8", "int8", "int4") stores the big matrices
    in that format (quantize.py), read from the quantized cache when it holds them (quantized_cache.py)
    and written there otherwise; `notice` hears one line when the cache is rebuilt or cannot be kept.
    Every safetensors header is read and checked against the model built on the meta device before
    memory is allocated for the model. `placement` (engine/placement.py) keeps the routed experts it
    does not place on the GPU in RAM, loaded there tensor by tensor (engine/offload.py).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder (a checkpoint is a folder with config.json and *.safetensors)")
    config = KimiLinearConfig.from_file(path / "config.json")
    if dtype is None:
        dtype = getattr(torch, config.dtype)
    headers = {file: read_header(file) for file in checkpoint_files(path)}
    model = build_on_meta(config)
    check_tensors(model, path, headers)
    if placement is not None and placement.offloaded:
        from kimi_desk.engine.offload import apply_placement

        apply_placement(model, placement)
    if quantize is not None:
        quantize_structure(model, quantize)
    materialize(model, torch.device(device), dtype)
    fingerprint = checkpoint_fingerprint(path)
    if quantize is None:
        load_weights(model, headers)
    else:
        cache = cache_file(path, quantize, fingerprint)
        cached = load_cached(model, cache, quantize, fingerprint, notice)
        load_weights(model, headers, quantized_loaded=cached)
        if not cached:
            write_cache(model, cache, quantize, fingerprint, notice)
    model.quantization = quantize
    model.fingerprint = fingerprint
    model.cache_dtype = getattr(torch, mla_cache_dtype(config, dtype, quantize, torch.device(device).type))
    from kimi_desk.engine.offload import finish_offload

    finish_offload(model)
    return model.eval()


def save_checkpoint(model: KimiLinearForCausalLM, path, max_shard_bytes: int | None = None) -> None:
    """Write config.json and safetensors in the official layout (sharded when max_shard_bytes is set)."""
    from safetensors.torch import save_file

    if getattr(model, "quantization", None):
        raise ValueError("a quantized model is not saved: its checkpoint is the full-precision one it was loaded from")
    if getattr(model, "fused", False):
        raise ValueError("a model with fused projections is not saved: its checkpoint is the one it was loaded from")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters())
    tensors = {}
    for name, (pname, index, _) in expected_tensors(model).items():
        t = params[pname].data if index is None else params[pname].data[index]
        tensors[name] = t.detach().to("cpu").contiguous()
    (path / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n", encoding="utf-8")
    if max_shard_bytes is None:
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        return
    shards: list[dict] = [{}]
    size = 0
    for name, t in tensors.items():
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / fname, metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


__all__ = ["CheckpointError", "ConfigError", "load_model", "save_checkpoint", "build_on_meta"]
