"""Weight-only quantization at load time: `--quantize fp8`.

The big matrices are stored as float8_e4m3fn with one float32 scale per output row (kernels/quant has
the format): every `*_proj` projection of the decoder layers (KDA, MLA, dense and shared MLPs) and the
routed experts. That halves the bytes of a bf16 model (the 48B model: 98 GB -> about 50 GB, so it fits
one 80 GB card with room for a long cache) and the bytes a decode step reads. Left as they are: the
embedding (a lookup), the output head (kept exact for the logits), norms, the router, the gates'
scalars, and `kv_b_proj`, which MLA's absorbed decode reads as a matrix of per-head blocks, not through
a linear call (4 M parameters per MLA layer).

The checkpoint stays what it is: the loader quantizes each tensor as it reads it (weights.py), so the
full-precision model never exists in memory. Activations, the KDA state and the MLA cache keep the
model's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from kimi_desk.kernels.quant import FP8, fp8_linear

METHODS = ("fp8",)

# Projections read as matrices rather than through a linear call: not quantized.
_KEPT_PROJECTIONS = ("kv_b_proj",)


def is_quantized_weight(name: str) -> bool:
    """Whether the checkpoint tensor / parameter `name` is stored quantized (the one rule: loading,
    memory estimates and tests all ask here)."""
    if not name.startswith("model.layers."):
        return False
    if ".experts.w" in name:  # the stacked routed experts, or one expert's tensor in the checkpoint
        return True
    module = name.removesuffix(".weight")
    leaf = module.rsplit(".", 1)[-1]
    return name.endswith(".weight") and "_proj" in leaf and leaf not in _KEPT_PROJECTIONS


class Fp8Linear(nn.Module):
    """nn.Linear without bias, its weight in fp8 with per-row scales: y = x @ (Q * s)^T."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 per-row scales"


def quantize_structure(model: nn.Module, method: str) -> None:
    """On a model built on the meta device: swap the quantized projections for Fp8Linear and give the
    experts fp8 parameters with scale buffers (`w1_scale`, ...), before storage is allocated."""
    if method not in METHODS:
        raise ValueError(f"quantize must be one of {', '.join(METHODS)}, got {method!r}")
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and is_quantized_weight(f"{name}.weight"):
            assert module.bias is None, name
            owner_name, _, attr = name.rpartition(".")
            replacement = Fp8Linear(module.in_features, module.out_features, device=module.weight.device)
            setattr(model.get_submodule(owner_name), attr, replacement)
    for name, param in list(model.named_parameters()):
        if ".experts.w" in name and is_quantized_weight(name):
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            setattr(owner, attr, nn.Parameter(torch.empty(param.shape, dtype=FP8, device=param.device),
                                              requires_grad=False))
            owner.register_buffer(f"{attr}_scale", torch.ones(param.shape[:-1], dtype=torch.float32,
                                                                device=param.device))


def scale_of(model: nn.Module, parameter_name: str) -> torch.Tensor:
    """The scale buffer that goes with a quantized parameter."""
    owner_name, _, attr = parameter_name.rpartition(".")
    return model.get_submodule(owner_name).get_buffer(f"{attr}_scale")
