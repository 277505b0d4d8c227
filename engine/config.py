"""The model configuration: Hugging Face `config.json` of Kimi Linear, read in one place.

Defaults are those of the official `KimiLinearConfig` class (used when a field is absent); the
values of the released 48B checkpoints are in `kimi-linear-spec.md` §1.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from kimi_desk.engine.errors import ConfigError
from kimi_desk.engine.files import BadJSON, brief, read_json, some

# Keys that config.json carries but that do not change the computation (bookkeeping of the
# Hugging Face tooling, or fields the architecture ignores). Known, so they are not reported.
_IGNORED_KEYS = {
    "architectures",
    "auto_map",
    "model_type",
    "transformers_version",
    "use_cache",
    "torch_dtype",
    "initializer_range",
    "rope_theta",
    "rope_scaling",
    "head_dim",
    "num_key_value_heads",
    "quantization_config",
    "_name_or_path",
    "pretraining_tp",
    "attention_bias",
    "attention_dropout",
    "output_router_logits",
    "num_nextn_predict_layers",
    "max_position_embeddings",
}


# What a real model could have, generously: the 48B checkpoint is far inside every one of these. Every
# size in config.json is checked against them before anything is built from it, so no config can make
# the loader allocate, loop or print without bound.
MAX_LAYERS = 4096
MAX_DIM = 1 << 20
MAX_HEADS = 1 << 16
MAX_EXPERTS = 1 << 16
MAX_VOCAB = 1 << 24
MAX_CONTEXT = 1 << 31
MAX_STOP_TOKENS = 256
# A config.json is a few KB; even a 4096-layer one is far below this.
CONFIG_MAX_BYTES = 1 << 20


@dataclass(frozen=True)
class _Kind:
    """What one field of config.json may hold: `kind` is int, number (finite, in the open interval
    (low, high)), bool, choice, layers (a list of integers), or token ids (an integer or a list of
    them); `null` also allows JSON null."""

    kind: str
    low: float = 0
    high: float = 0
    null: bool = False
    choices: tuple[str, ...] = ()

    def accepts(self, value) -> bool:
        if value is None:
            return self.null
        if self.kind == "int":
            return _is_int(value) and self.low <= value <= self.high
        if self.kind == "number":
            number = _is_int(value) or (isinstance(value, float) and math.isfinite(value))
            return number and self.low < value < self.high
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "choice":
            return isinstance(value, str) and value in self.choices
        if self.kind == "token ids":
            ids = value if isinstance(value, list) and len(value) <= MAX_STOP_TOKENS else [value]
            return all(_is_int(i) and self.low <= i <= self.high for i in ids)
        # Layer lists: their numbers are checked against num_hidden_layers once every field is known.
        return isinstance(value, list) and len(value) <= self.high and all(_is_int(i) for i in value)

    def describe(self) -> str:
        null = "null or " if self.null else ""
        if self.kind == "int":
            return f"{null}an integer from {self.low:,} to {self.high:,}"
        if self.kind == "number":
            return f"{null}a number in ({self.low:g}, {self.high:g})"
        if self.kind == "bool":
            return f"{null}true or false"
        if self.kind == "choice":
            return null + " or ".join(repr(c) for c in self.choices)
        if self.kind == "token ids":
            return f"{null}a token id or a list of at most {MAX_STOP_TOKENS} (each from 0 to {self.high:,})"
        return f"a list of at most {self.high:,} layer numbers (integers)"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_TOKEN = _Kind("int", 0, MAX_VOCAB - 1, null=True)
_BOOL = _Kind("bool")
# Every field of KimiLinearConfig: what validate() accepts, before any check across fields.
FIELD_KINDS: dict[str, _Kind] = {
    "vocab_size": _Kind("int", 1, MAX_VOCAB),
    "hidden_size": _Kind("int", 1, MAX_DIM),
    "intermediate_size": _Kind("int", 1, MAX_DIM),
    "num_hidden_layers": _Kind("int", 1, MAX_LAYERS),
    "hidden_act": _Kind("choice", choices=("silu",)),
    "rms_norm_eps": _Kind("number", 0, 1),
    "num_attention_heads": _Kind("int", 1, MAX_HEADS),
    "q_lora_rank": _Kind("int", 1, MAX_DIM, null=True),
    "kv_lora_rank": _Kind("int", 1, MAX_DIM),
    "qk_nope_head_dim": _Kind("int", 1, MAX_DIM),
    "qk_rope_head_dim": _Kind("int", 0, MAX_DIM),
    "v_head_dim": _Kind("int", 1, MAX_DIM),
    "mla_use_nope": _BOOL,
    "kda_layers": _Kind("layers", high=MAX_LAYERS),
    "full_attn_layers": _Kind("layers", high=MAX_LAYERS),
    "kda_num_heads": _Kind("int", 1, MAX_HEADS),
    "kda_head_dim": _Kind("int", 1, MAX_DIM),
    "short_conv_kernel_size": _Kind("int", 1, 1024),
    "num_experts": _Kind("int", 1, MAX_EXPERTS, null=True),
    "num_experts_per_token": _Kind("int", 1, MAX_EXPERTS),
    "moe_intermediate_size": _Kind("int", 1, MAX_DIM),
    "num_shared_experts": _Kind("int", 0, MAX_EXPERTS),
    "first_k_dense_replace": _Kind("int", 0, MAX_LAYERS),
    "moe_layer_freq": _Kind("int", 1, MAX_LAYERS),
    "moe_renormalize": _BOOL,
    "moe_router_activation_func": _Kind("choice", choices=("sigmoid", "softmax")),
    "routed_scaling_factor": _Kind("number", 0, 1e6),
    "use_grouped_topk": _BOOL,
    "num_expert_group": _Kind("int", 1, MAX_EXPERTS),
    "topk_group": _Kind("int", 1, MAX_EXPERTS),
    "model_max_length": _Kind("int", 1, MAX_CONTEXT),
    "tie_word_embeddings": _BOOL,
    "bos_token_id": _TOKEN,
    "eos_token_id": _Kind("token ids", 0, MAX_VOCAB - 1, null=True),
    "pad_token_id": _TOKEN,
    "dtype": _Kind("choice", choices=("bfloat16", "float16", "float32")),
}
# Where config.json keeps the fields that live inside linear_attn_config, for messages.
_JSON_NAMES = {
    "kda_layers": "linear_attn_config.kda_layers",
    "full_attn_layers": "linear_attn_config.full_attn_layers",
    "kda_num_heads": "linear_attn_config.num_heads",
    "kda_head_dim": "linear_attn_config.head_dim",
    "short_conv_kernel_size": "linear_attn_config.short_conv_kernel_size",
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
    def moe_layers(self) -> list[int]:
        """The indices of the decoder layers whose MLP is a mixture of experts, ascending."""
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def layer_kinds(self) -> list[str]:
        """'kda' or 'mla' per 0-based layer."""
        kda = set(self.kda_layers)
        return ["kda" if i + 1 in kda else "mla" for i in range(self.num_hidden_layers)]

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
            raise ConfigError(f"config.json: model_type is {brief(model_type)}, expected 'kimi_linear'")
        values: dict = {}
        linear = raw.pop("linear_attn_config", None)
        if linear is not None:
            if not isinstance(linear, dict):
                raise ConfigError("config.json: linear_attn_config must be an object")
            linear = dict(linear)
            for src, dst in [
                ("kda_layers", "kda_layers"),
                ("full_attn_layers", "full_attn_layers"),
                ("num_heads", "kda_num_heads"),
                ("head_dim", "kda_head_dim"),
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
            raw = read_json(path, CONFIG_MAX_BYTES)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except BadJSON as exc:
            raise ConfigError(f"{path}: {exc}") from None
        return cls.from_dict(raw)

    def to_dict(self) -> dict:
        """The official config.json layout (1-based layer lists inside linear_attn_config)."""
        out = {
            "architectures": ["KimiLinearForCausalLM"],
            "model_type": "kimi_linear",
        }
        for f in dataclasses.fields(self):
            if f.name in {
                "kda_layers",
                "full_attn_layers",
                "kda_num_heads",
                "kda_head_dim",
                "short_conv_kernel_size",
                "unknown_keys",
            }:
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
        """Raise ConfigError (one line) unless every field has its kind and bounds (FIELD_KINDS) and the
        fields agree with each other. The bounds are checked first, so the checks across fields loop
        over at most MAX_LAYERS layers, and a message shows a few values of a list and its length."""

        def need(cond: bool, message: str) -> None:
            if not cond:
                raise ConfigError(f"config.json: {message}")

        for name, kind in FIELD_KINDS.items():
            value = getattr(self, name)
            need(kind.accepts(value), f"{_JSON_NAMES.get(name, name)} must be {kind.describe()}, got {brief(value)}")
        need(
            self.q_lora_rank is None,
            f"q_lora_rank={self.q_lora_rank}: Kimi Linear projects queries directly (q_lora_rank must be null)",
        )
        need(
            self.mla_use_nope or not self.full_attn_layers,
            "mla_use_nope is false: Kimi Linear's MLA layers use no rotary embedding (NoPE)",
        )
        for name in ["kda_layers", "full_attn_layers"]:
            bad = [i for i in getattr(self, name) if not 1 <= i <= self.num_hidden_layers]
            need(
                not bad,
                f"{_JSON_NAMES[name]} has {some(bad)}: layer numbers are 1-based, "
                f"from 1 to num_hidden_layers={self.num_hidden_layers}",
            )
        both = sorted(set(self.kda_layers) & set(self.full_attn_layers))
        need(not both, f"layers {some(both)} are listed both as kda_layers and full_attn_layers")
        covered = set(self.kda_layers) | set(self.full_attn_layers)
        missing = [i for i in range(1, self.num_hidden_layers + 1) if i not in covered]
        need(not missing, f"layers {some(missing)} are in neither kda_layers nor full_attn_layers")
        if self.num_experts is not None:
            need(
                self.num_experts_per_token <= self.num_experts,
                f"num_experts_per_token={self.num_experts_per_token} exceeds num_experts={self.num_experts}",
            )
            need(
                self.num_expert_group == 1 and self.topk_group == 1,
                "grouped expert selection (num_expert_group > 1) is not supported; Kimi Linear uses one group",
            )
        need(not self.tie_word_embeddings, "tie_word_embeddings=true is not supported (Kimi Linear unties them)")
