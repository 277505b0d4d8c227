"""The model configuration: Hugging Face `config.json` of Kimi Linear, read in one place.

Defaults are those of the official `KimiLinearConfig` class (used when a field is absent); the
values of the released 48B checkpoints are in `kimi-linear-spec.md` §1.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from kimi_desk.engine.errors import ConfigError


# Keys that config.json carries but that do not change the computation (bookkeeping of the
# Hugging Face tooling, or fields the architecture ignores). Known, so they are not reported.
_IGNORED_KEYS = {
    "architectures", "auto_map", "model_type", "transformers_version", "use_cache", "torch_dtype",
    "initializer_range", "rope_theta", "rope_scaling", "head_dim", "num_key_value_heads",
    "quantization_config", "_name_or_path", "pretraining_tp", "attention_bias", "attention_dropout",
    "output_router_logits", "num_nextn_predict_layers", "max_position_embeddings",
}


@dataclass
class KimiLinearConfig:
    vocab_size: int = 163840
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    # MLA (full attention) layers.
    num_attention_heads: int = 32
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    mla_use_nope: bool = False
    # KDA layers, 1-based layer numbers as in the checkpoint's config.
    kda_layers: list[int] = field(default_factory=list)
    full_attn_layers: list[int] = field(default_factory=list)
    kda_num_heads: int = 32
    kda_head_dim: int = 128
    short_conv_kernel_size: int = 4
    # MoE.
    num_experts: int | None = None
    num_experts_per_token: int = 1
    moe_intermediate_size: int = 1024
    num_shared_experts: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    moe_renormalize: bool = True
    moe_router_activation_func: str = "sigmoid"
    routed_scaling_factor: float = 1.0
    use_grouped_topk: bool = True
    num_expert_group: int = 1
    topk_group: int = 1
    # Text and limits.
    model_max_length: int = 1048576
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0
    dtype: str = "bfloat16"
    # Keys config.json had that this class does not know; reported by the loader, never dropped silently.
    unknown_keys: dict = field(default_factory=dict)

    # -- derived ----------------------------------------------------------------------------------

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kda_projection_size(self) -> int:
        return self.kda_num_heads * self.kda_head_dim

    @property
    def mla_latent_size(self) -> int:
        """Values cached per token per MLA layer: the normalised latent plus the shared key part."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_kda_layer(self, layer_idx: int) -> bool:
        """`layer_idx` is 0-based; the config's lists are 1-based."""
        return (layer_idx + 1) in self.kda_layers

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.num_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def layer_kinds(self) -> list[str]:
        """'kda' or 'mla' per 0-based layer."""
        return ["kda" if self.is_kda_layer(i) else "mla" for i in range(self.num_hidden_layers)]

    @property
    def stop_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        if eos is None:
            return []
        return list(eos) if isinstance(eos, list) else [eos]

    # -- reading ----------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: dict) -> "KimiLinearConfig":
        if not isinstance(raw, dict):
            raise ConfigError("config.json must hold a JSON object")
        raw = dict(raw)
        model_type = raw.get("model_type")
        if model_type is not None and model_type != "kimi_linear":
            raise ConfigError(f"config.json: model_type is {model_type!r}, expected 'kimi_linear'")
        values: dict = {}
        linear = raw.pop("linear_attn_config", None)
        if linear is not None:
            if not isinstance(linear, dict):
                raise ConfigError("config.json: linear_attn_config must be an object")
            linear = dict(linear)
            for src, dst in [
                ("kda_layers", "kda_layers"), ("full_attn_layers", "full_attn_layers"),
                ("num_heads", "kda_num_heads"), ("head_dim", "kda_head_dim"),
                ("short_conv_kernel_size", "short_conv_kernel_size"),
            ]:
                if src in linear:
                    values[dst] = linear.pop(src)
            for key, value in linear.items():
                values.setdefault("unknown_keys", {})[f"linear_attn_config.{key}"] = value
            if values.get("kda_layers") is None or values.get("full_attn_layers") is None:
                raise ConfigError("config.json: linear_attn_config needs both kda_layers and full_attn_layers")
        if "dtype" not in raw and "torch_dtype" in raw:
            raw["dtype"] = raw["torch_dtype"]
        if "max_position_embeddings" in raw and "model_max_length" not in raw:
            raw["model_max_length"] = raw["max_position_embeddings"]
        known = {f.name for f in dataclasses.fields(cls)} - {"unknown_keys"}
        for key, value in raw.items():
            if key in known:
                values[key] = value
            elif key not in _IGNORED_KEYS:
                values.setdefault("unknown_keys", {})[key] = value
        config = cls(**values)
        config.validate()
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> "KimiLinearConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(raw)

    def to_dict(self) -> dict:
        """The official config.json layout (1-based layer lists inside linear_attn_config)."""
        out = {
            "architectures": ["KimiLinearForCausalLM"],
            "model_type": "kimi_linear",
        }
        for f in dataclasses.fields(self):
            if f.name in {"kda_layers", "full_attn_layers", "kda_num_heads", "kda_head_dim",
                          "short_conv_kernel_size", "unknown_keys"}:
                continue
            out[f.name] = getattr(self, f.name)
        out["num_key_value_heads"] = self.num_attention_heads
        out["head_dim"] = self.hidden_size // self.num_attention_heads
        out["linear_attn_config"] = {
            "kda_layers": list(self.kda_layers),
            "full_attn_layers": list(self.full_attn_layers),
            "num_heads": self.kda_num_heads,
            "head_dim": self.kda_head_dim,
            "short_conv_kernel_size": self.short_conv_kernel_size,
        }
        return out

    def validate(self) -> None:
        def need(cond: bool, message: str) -> None:
            if not cond:
                raise ConfigError(f"config.json: {message}")

        for name in ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim",
                     "kda_num_heads", "kda_head_dim", "short_conv_kernel_size", "moe_intermediate_size",
                     "num_experts_per_token", "moe_layer_freq", "model_max_length"]:
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"{name} must be a positive integer, got {value!r}")
        need(isinstance(self.qk_rope_head_dim, int) and self.qk_rope_head_dim >= 0,
             f"qk_rope_head_dim must be a non-negative integer, got {self.qk_rope_head_dim!r}")
        need(isinstance(self.rms_norm_eps, (int, float)) and 0 < self.rms_norm_eps < 1,
             f"rms_norm_eps must be in (0, 1), got {self.rms_norm_eps!r}")
        need(self.hidden_act == "silu", f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        need(self.q_lora_rank is None,
             f"q_lora_rank={self.q_lora_rank!r}: Kimi Linear projects queries directly (q_lora_rank must be null)")
        need(bool(self.mla_use_nope) or not self.full_attn_layers,
             "mla_use_nope is false: Kimi Linear's MLA layers use no rotary embedding (NoPE)")
        for name in ["kda_layers", "full_attn_layers"]:
            layers = getattr(self, name)
            need(isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers),
                 f"linear_attn_config.{name} must be a list of integers")
            bad = [i for i in layers if not 1 <= i <= self.num_hidden_layers]
            need(not bad, f"linear_attn_config.{name} has {bad}: layer numbers are 1-based, "
                          f"from 1 to num_hidden_layers={self.num_hidden_layers}")
        both = sorted(set(self.kda_layers) & set(self.full_attn_layers))
        need(not both, f"layers {both} are listed both as kda_layers and full_attn_layers")
        covered = set(self.kda_layers) | set(self.full_attn_layers)
        missing = [i for i in range(1, self.num_hidden_layers + 1) if i not in covered]
        need(not missing, f"layers {missing} are in neither kda_layers nor full_attn_layers")
        need(self.moe_router_activation_func in ("sigmoid", "softmax"),
             f"moe_router_activation_func must be 'sigmoid' or 'softmax', got {self.moe_router_activation_func!r}")
        if self.num_experts is not None:
            need(isinstance(self.num_experts, int) and self.num_experts > 0,
                 f"num_experts must be a positive integer or null, got {self.num_experts!r}")
            need(self.num_experts_per_token <= self.num_experts,
                 f"num_experts_per_token={self.num_experts_per_token} exceeds num_experts={self.num_experts}")
            need(self.num_expert_group == 1 and self.topk_group == 1,
                 "grouped expert selection (num_expert_group > 1) is not supported; Kimi Linear uses one group")
        need(self.dtype in ("bfloat16", "float16", "float32"),
             f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")
        need(not self.tie_word_embeddings, "tie_word_embeddings=true is not supported (Kimi Linear unties them)")
        need(math.isfinite(float(self.routed_scaling_factor)),
             f"routed_scaling_factor must be a number, got {self.routed_scaling_factor!r}")
