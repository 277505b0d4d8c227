"""Weight-only quantization at load time: `--quantize fp8|int8|int4`.

Which matrices (`weight_format`, the one rule that loading, the disk cache, memory estimates and tests
ask):
- every `*_proj` of the decoder layers (KDA, MLA, dense and shared MLPs) and the routed experts take
  the format asked for;
- with int4, KDA's gate projections (the low-rank f/g halves) and beta take int8: small (about 1% of a
  layer) and they set how fast each channel forgets, so 4-bit errors there would compound over a whole
  document; so do the attention layers' query and key projections and the dense MLP of the first
  layer, the matrices the demo model's held-out perplexity is most sensitive to (BENCHMARKS.md, weight
  formats). They are read every token but are a small part of the 48B model: its routed experts, over
  90% of its weights, stay int4;
- with int8 and int4, the embedding takes int8 (a token reads one row of it); the output head takes
  the format asked for, int4 in groups of 32 (HEAD_INT4_GROUP) rather than the layers' 128: it is read
  whole every token (in int8 it was 40% of what an int4 decode step of the 48B shapes reads on a CPU),
  and the finer groups keep the demo model's held-out perplexity within 0.4% of the unquantized one
  (0.66% with groups of 128);
- left as they are: norms, routers, the gates' scalars, the short convolutions, and `kv_b_proj`, which
  MLA's absorbed decode reads as a matrix of per-head blocks rather than through a linear call.

The formats are those of kernels/quant (fp8 and int8 with a float32 scale per output row; int4 in
groups of 32-128 inputs with a bf16 scale and midpoint). A quantized parameter keeps its name and holds
the codes; beside it on its module sit `<name>_scale` (and for int4 `<name>_zero`). The checkpoint
stays what it is: the loader quantizes each tensor as it reads it (weights.py) and keeps the result
in a disk cache (quantized_cache.py), so the full-precision model never exists in memory. Activations,
the KDA state and the MLA cache keep the model's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from kimi_desk.engine.errors import ConfigError
from kimi_desk.kernels.quant import (
    FP8,
    dequantize_rows,
    int4_group_size,
    int4_linear,
    quantize_fp8_rows,
    quantize_int4_groups,
    quantize_int8_rows,
    row_scaled_linear,
)
from kimi_desk.kernels.quant.cpu import (
    CpuInt4Weight,
    cpu_int4_fits,
    int4_linear_cpu,
    pack_int4_expert_for_cpu,
    pack_int4_for_cpu,
    stack_int4_experts_for_cpu,
)

METHODS = ("fp8", "int8", "int4")
# Bytes a quantized weight takes, scales included (int4: a bf16 scale and zero per group of 32-128).
BYTES_PER_WEIGHT = {"fp8": 1.0, "int8": 1.0, "int4": 0.5 + 4 / 64}

# Projections read as matrices rather than through a linear call: never quantized.
_KEPT_PROJECTIONS = ("kv_b_proj",)
# int8 where the rest is int4 (the module's text says why): KDA's gate projections and beta, the
# attention layers' queries and keys, and (by its ".mlp." name) the dense MLP of the first layer.
_INT8_UNDER_INT4 = ("f_a_proj", "f_b_proj", "g_a_proj", "g_b_proj", "b_proj", "q_proj", "k_proj")
_HEAD = "lm_head.weight"
_ENDS = ("model.embed_tokens.weight", _HEAD)
# The output head's int4 groups: finer than the layers' 128 (the module's text says why).
HEAD_INT4_GROUP = 32
_CODE_DTYPES = {"fp8": FP8, "int8": torch.int8, "int4": torch.uint8}


def weight_format(name: str, method: str | None) -> str | None:
    """The format the checkpoint tensor or parameter `name` is stored in under `method`, or None."""
    if method is None:
        return None
    if name == _HEAD and method == "int4":
        return "int4"
    if name in _ENDS:
        return "int8" if method in ("int8", "int4") else None
    if not name.startswith("model.layers."):
        return None
    if ".experts." in name:  # the routed experts: stacked, split (engine/offload.py), or one expert's tensor
        return method
    leaf = name.removesuffix(".weight").rsplit(".", 1)[-1]
    if not name.endswith(".weight") or "_proj" not in leaf or leaf in _KEPT_PROJECTIONS:
        return None
    if method == "int4" and (leaf in _INT8_UNDER_INT4 or ".mlp." in name):
        return "int8"
    return method


def int4_group(name: str, width: int) -> int | None:
    """The int4 group size of parameter `name` with rows `width` inputs wide: HEAD_INT4_GROUP for the
    head, else the largest of kernels/quant's sizes dividing the width (None: no int4 for it)."""
    if name == _HEAD:
        return HEAD_INT4_GROUP if width % HEAD_INT4_GROUP == 0 else None
    return int4_group_size(width)


def is_quantized_weight(name: str, method: str = "fp8") -> bool:
    return weight_format(name, method) is not None


def format_of(codes: torch.Tensor) -> str | None:
    """The format a parameter's dtype says it holds (None: not quantized)."""
    return {FP8: "fp8", torch.int8: "int8", torch.uint8: "int4"}.get(codes.dtype)


def logical_shape(codes: torch.Tensor) -> tuple[int, ...]:
    """The shape of the matrix (or stack) that `codes` stand for: int4 packs two inputs a byte."""
    shape = tuple(codes.shape)
    return shape[:-1] + (shape[-1] * 2,) if codes.dtype == torch.uint8 else shape


# -- modules ----------------------------------------------------------------------------------------


class RowScaledLinear(nn.Module):
    """nn.Linear without bias, its weight fp8 or int8 with per-row scales: y = x @ (Q * s)^T."""

    def __init__(self, in_features: int, out_features: int, code_dtype: torch.dtype = FP8, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=code_dtype, device=device), requires_grad=False
        )
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return row_scaled_linear(x, self.weight, self.weight_scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {format_of(self.weight)} rows"


class Int4Linear(nn.Module):
    """nn.Linear without bias, its weight in int4 groups: y = x @ ((q - 8) s + z)^T."""

    def __init__(self, in_features: int, out_features: int, device=None, group: int | None = None):
        super().__init__()
        group = group or int4_group_size(in_features)
        if group is None:
            raise ConfigError(
                f"int4 needs input widths that are multiples of 32, this model has {in_features}; use --quantize int8"
            )
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device), requires_grad=False
        )
        groups = in_features // group
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=torch.bfloat16, device=device))
        self.register_buffer("weight_zero", torch.zeros(out_features, groups, dtype=torch.bfloat16, device=device))
        # On the CPU, the same matrix in PyTorch's int4 operator's layout (prepare_for_cpu), instead of
        # the three tensors above.
        self.cpu_weight: CpuInt4Weight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_weight is not None:
            return int4_linear_cpu(x, self.cpu_weight)
        return int4_linear(x, self.weight, self.weight_scale, self.weight_zero)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"int4 groups of {self.in_features // self.weight_scale.shape[-1]}"
        )


class Int8Embedding(nn.Module):
    """nn.Embedding with int8 rows and one float32 scale per row: only the looked-up rows are dequantized."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None):
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device), requires_grad=False
        )
        self.register_buffer("weight_scale", torch.ones(num_embeddings, dtype=torch.float32, device=device))
        self.dtype = torch.float32  # the model's activation dtype, set by materialize

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return dequantize_rows(self.weight[ids], self.weight_scale[ids], self.dtype)


def quantized_linear(in_features: int, out_features: int, fmt: str, device=None, group: int | None = None) -> nn.Module:
    if fmt == "int4":
        return Int4Linear(in_features, out_features, device=device, group=group)
    return RowScaledLinear(in_features, out_features, _CODE_DTYPES[fmt], device=device)


def quantize_structure(model: nn.Module, method: str) -> None:
    """On a model built on the meta device: swap the quantized projections (and ends) for the modules
    above and give the experts code parameters with their scale (and zero) buffers, before storage is
    allocated."""
    if method not in METHODS:
        raise ValueError(f"quantize must be one of {', '.join(METHODS)}, got {method!r}")
    for name, module in list(model.named_modules()):
        fmt = weight_format(f"{name}.weight", method)
        if fmt is None:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if isinstance(module, nn.Embedding):
            setattr(
                owner, attr, Int8Embedding(module.num_embeddings, module.embedding_dim, device=module.weight.device)
            )
        elif isinstance(module, nn.Linear):
            assert module.bias is None, name
            group = int4_group(f"{name}.weight", module.in_features)
            setattr(
                owner, attr, quantized_linear(module.in_features, module.out_features, fmt, module.weight.device, group)
            )
    for name, param in list(model.named_parameters()):
        fmt = weight_format(name, method)
        if ".experts." not in name or fmt is None:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        *lead, D = param.shape
        if fmt == "int4":
            group = int4_group_size(D)
            if group is None:
                raise ConfigError(
                    f"int4 needs input widths that are multiples of 32, this model has {D} ({name}); "
                    "use --quantize int8"
                )
            codes = torch.empty(*lead, D // 2, dtype=torch.uint8, device=param.device)
            owner.register_buffer(
                f"{attr}_scale", torch.ones(*lead, D // group, dtype=torch.bfloat16, device=param.device)
            )
            owner.register_buffer(
                f"{attr}_zero", torch.zeros(*lead, D // group, dtype=torch.bfloat16, device=param.device)
            )
        else:
            codes = torch.empty(param.shape, dtype=_CODE_DTYPES[fmt], device=param.device)
            owner.register_buffer(f"{attr}_scale", torch.ones(lead, dtype=torch.float32, device=param.device))
        setattr(owner, attr, nn.Parameter(codes, requires_grad=False))


def sidecars(model: nn.Module, parameter_name: str) -> tuple[torch.Tensor, ...]:
    """The buffers that go with a quantized parameter: (scale,) or, for int4, (scale, zero)."""
    owner_name, _, attr = parameter_name.rpartition(".")
    owner = model.get_submodule(owner_name)
    found = [owner.get_buffer(f"{attr}_scale")]
    if hasattr(owner, f"{attr}_zero"):
        found.append(owner.get_buffer(f"{attr}_zero"))
    return tuple(found)


# Rows quantized per call in quantize_into: 4096 rows of the 48B model's 2304 inputs are 38 MB in float32.
QUANTIZE_ROWS_PER_BLOCK = 4096


def quantize_into(model: nn.Module, parameter_name: str, index: int | None, weight: torch.Tensor, on=None) -> None:
    """Quantize the full-precision `weight` (one matrix; expert `index` of a stack) into the parameter's
    codes and sidecars, in their format, on their device (computed on device `on` when given)."""
    codes = dict(model.named_parameters())[parameter_name].data
    parts = sidecars(model, parameter_name)
    targets = (codes, *parts) if index is None else (codes[index], *(p[index] for p in parts))
    weight = weight.to(on if on is not None else codes.device)
    fmt = format_of(codes)
    # Every format scales each row on its own, so a block of rows at a time gives the same codes while
    # bounding the float32 temporaries (the output head at once: about 4.4 GiB more at the peak).
    for start in range(0, weight.shape[0], QUANTIZE_ROWS_PER_BLOCK):
        block = weight[start : start + QUANTIZE_ROWS_PER_BLOCK]
        quantized = (
            quantize_int4_groups(block, block.shape[-1] // parts[0].shape[-1])
            if fmt == "int4"
            else quantize_int8_rows(block)
            if fmt == "int8"
            else quantize_fp8_rows(block)
        )
        for target, value in zip(targets, quantized, strict=True):
            target[start : start + block.shape[0]].copy_(value)


def int4_experts_to_cpu_layout(experts: nn.Module, pin: bool = False) -> None:
    """An int4 Experts stack's experts to PyTorch's int4 operator's layout, w1 and w3 joined, stacked
    over the experts (kernels/quant/cpu.py stack_int4_experts_for_cpu): `experts.tiles` the stacks,
    `experts.cpu_weights[e]` expert e's views. The stack's own tensors are dropped after."""
    mats = [
        (getattr(experts, a).data, getattr(experts, f"{a}_scale"), getattr(experts, f"{a}_zero"))
        for a in ("w1", "w2", "w3")
    ]
    n = mats[0][0].shape[0]
    packed = (pack_int4_expert_for_cpu(*(tuple(t[e] for t in m) for m in mats)) for e in range(n))
    experts.tiles, experts.cpu_weights = stack_int4_experts_for_cpu(packed, n, pin)
    empty = torch.empty(0, dtype=torch.uint8)
    for attr in ("w1", "w2", "w3"):
        setattr(experts, attr, nn.Parameter(empty, requires_grad=False))
        setattr(experts, f"{attr}_scale", empty)
        setattr(experts, f"{attr}_zero", empty)


def prepare_for_cpu(model: nn.Module) -> None:
    """Move every int4 matrix of a model on the CPU to PyTorch's int4 operator's layout, one matrix (one
    layer's experts) at a time, dropping our layout as it goes (memory never holds both for more than
    that). Where the
    operator is missing (an older PyTorch) or does not take the shape, a matrix keeps our layout and the
    dequantizing path."""
    empty = torch.empty(0, dtype=torch.uint8)
    for module in model.modules():
        if getattr(module, "keep_layout", False):  # an offloaded layer's halves (engine/offload.py)
            continue
        if (
            isinstance(module, Int4Linear)
            and module.weight.device.type == "cpu"
            and module.cpu_weight is None
            and cpu_int4_fits(module.out_features, module.in_features)
        ):
            module.cpu_weight = pack_int4_for_cpu(module.weight.data, module.weight_scale, module.weight_zero)
            module.weight = nn.Parameter(empty, requires_grad=False)
            module.weight_scale = module.weight_zero = empty
        if (
            hasattr(module, "w1_zero")
            and module.w1.device.type == "cpu"
            and getattr(module, "cpu_weights", None) is None
            and all(cpu_int4_fits(*logical_shape(getattr(module, w))[1:]) for w in ("w1", "w2", "w3"))
        ):
            int4_experts_to_cpu_layout(module)
