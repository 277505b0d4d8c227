"""Checkpoints in the official Hugging Face layout: the name table, strict loading, writing.

A checkpoint folder holds config.json and either model.safetensors or shards listed in
model.safetensors.index.json, with the tensor names of kimi-linear-spec.md §2. Loading builds the
model on the meta device, then fills every parameter from memory-mapped safetensors: a missing,
unexpected or mis-shaped tensor is an error that names it. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from kimi_desk.engine.config import KimiLinearConfig
from kimi_desk.engine.errors import CheckpointError, ConfigError
from kimi_desk.engine.model import KimiLinearForCausalLM
from kimi_desk.engine.quantize import Int8Embedding, format_of, logical_shape, quantize_into, quantize_structure
from kimi_desk.engine.quantized_cache import cache_file, load_cached, write_cache


# Parameters kept in float32 whatever the model dtype: the gates' scalars and the short convolutions
# (as the reference implementations allocate them), the router's selection bias, and two small matrices
# every step multiplies in float32: the router (its scores choose the experts; 2.4 MB a layer at the 48B
# shapes) and MLA's kv_b_proj (the absorbed decode's W_UK and W_UV; 17 MB a layer). Held in float32 they
# are not converted again at every step (on an H100 those copies took 7% of a decode step's GPU time).
FP32_PARAMETERS = ("A_log", "dt_bias", "conv1d.weight", "e_score_correction_bias", "block_sparse_moe.gate.weight",
                   "self_attn.kv_b_proj.weight")

_EXPERT_PREFIX = "block_sparse_moe.experts."


def checkpoint_to_parameter(name: str) -> tuple[str, int | None]:
    """The one name table: a checkpoint tensor name -> (our parameter name, expert index or None).

    Every name maps to itself, except the routed experts `...experts.{j}.w{1,2,3}.weight`, which live
    stacked in `...experts.w{1,2,3}` at index j.
    """
    if _EXPERT_PREFIX in name and name.endswith(".weight"):
        head, tail = name.split(_EXPERT_PREFIX, 1)
        index, proj, _ = tail.split(".")
        if index.isdigit() and proj in ("w1", "w2", "w3"):
            return f"{head}{_EXPERT_PREFIX}{proj}", int(index)
    return name, None


def expected_tensors(model: KimiLinearForCausalLM) -> dict[str, tuple[str, int | None, tuple[int, ...]]]:
    """Checkpoint name -> (parameter name, expert index, shape), for every tensor the model needs."""
    out = {}
    for pname, param in model.named_parameters():
        if pname.startswith("model.layers.") and ".experts.w" in pname:
            head, proj = pname.rsplit(".", 1)
            for j in range(param.shape[0]):
                out[f"{head}.{j}.{proj}.weight"] = (pname, j, logical_shape(param)[1:])
        else:
            out[pname] = (pname, None, logical_shape(param))
    return out


def build_on_meta(config: KimiLinearConfig) -> KimiLinearForCausalLM:
    with torch.device("meta"):
        return KimiLinearForCausalLM(config)


def materialize(model: KimiLinearForCausalLM, device, dtype: torch.dtype) -> None:
    """Give every meta parameter real (uninitialised) storage: model dtype, or fp32 where it must be, or
    the codes' dtype where quantize_structure made it so; and the meta buffers (quantization scales)
    too."""
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
        setattr(owner, attr, torch.nn.Parameter(torch.empty(param.shape, dtype=want, device=device),
                                                requires_grad=False))
    for bname, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            owner_name, _, attr = bname.rpartition(".")
            model.get_submodule(owner_name).register_buffer(
                attr, torch.empty(buffer.shape, dtype=buffer.dtype, device=device))


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise CheckpointError(f"{path}: shard {missing[0]} listed in model.safetensors.index.json is missing")
        return [path / f for f in files]
    if single.is_file():
        return [single]
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _check_header(file: Path) -> None:
    """safetensors refuses a truncated file only when a tensor is read; check the sizes up front so the
    message names the file."""
    size = file.stat().st_size
    with open(file, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{file}: truncated or not a safetensors file")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise CheckpointError(f"{file}: truncated or not a safetensors file (header runs past the end)")
        try:
            header = json.loads(fh.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{file}: damaged safetensors header") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise CheckpointError(f"{file}: truncated ({size} bytes, the header describes {8 + header_len + end})")


def load_weights(model: KimiLinearForCausalLM, path: Path, quantized_loaded: bool = False) -> None:
    """Fill every parameter from the checkpoint at `path`, quantizing as it reads; with
    `quantized_loaded` the quantized ones are already filled (from the disk cache) and only checked
    against the checkpoint's shapes, not read."""
    expected = expected_tensors(model)
    params = dict(model.named_parameters())
    seen: set[str] = set()
    for file in checkpoint_files(path):
        _check_header(file)
        try:
            with safe_open(file, framework="pt", device="cpu") as reader:
                for name in reader.keys():
                    if name not in expected:
                        raise CheckpointError(f"{file.name}: unexpected tensor {name}")
                    if name in seen:
                        raise CheckpointError(f"{file.name}: tensor {name} appears twice in the checkpoint")
                    pname, index, shape = expected[name]
                    got = tuple(reader.get_slice(name).get_shape())
                    if got != shape:
                        raise CheckpointError(f"{file.name}: tensor {name} has shape {list(got)}, expected {list(shape)}")
                    if quantized_loaded and format_of(params[pname]) is not None:
                        seen.add(name)
                        continue
                    tensor = reader.get_tensor(name)
                    if not tensor.is_floating_point():
                        raise CheckpointError(f"{file.name}: tensor {name} has dtype {tensor.dtype}, expected floating point")
                    if format_of(params[pname]) is not None:
                        # Quantized as read, on the target device: the full-precision model never exists.
                        quantize_into(model, pname, index, tensor)
                    else:
                        (params[pname].data if index is None else params[pname].data[index]).copy_(tensor)
                    seen.add(name)
        except SafetensorError as exc:
            raise CheckpointError(f"{file}: cannot read safetensors ({exc})") from None
    missing = sorted(set(expected) - seen)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: missing tensor {missing[0]}{more}")


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


def load_model(path, device="cpu", dtype: torch.dtype | None = None, quantize: str | None = None,
               notice: Callable[[str], None] = lambda line: None) -> KimiLinearForCausalLM:
    """A checkpoint folder in the official layout -> a ready model in eval mode.

    `dtype` defaults to the checkpoint's (config.json `dtype`), float32 on a CPU that would be slow in
    half precision is the caller's choice. `quantize` ("fp8", "int8", "int4") stores the big matrices
    in that format (quantize.py), read from the quantized cache when it holds them (quantized_cache.py)
    and written there otherwise; `notice` hears one line when the cache is rebuilt or cannot be kept.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder (a checkpoint is a folder with config.json and *.safetensors)")
    config = KimiLinearConfig.from_file(path / "config.json")
    if dtype is None:
        dtype = getattr(torch, config.dtype)
    model = build_on_meta(config)
    if quantize is not None:
        quantize_structure(model, quantize)
    materialize(model, torch.device(device), dtype)
    fingerprint = checkpoint_fingerprint(path)
    if quantize is None:
        load_weights(model, path)
    else:
        cache = cache_file(path, quantize, fingerprint)
        cached = load_cached(model, cache, quantize, fingerprint, notice)
        load_weights(model, path, quantized_loaded=cached)
        if not cached:
            write_cache(model, cache, quantize, fingerprint, notice)
    model.quantization = quantize
    model.fingerprint = fingerprint
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
