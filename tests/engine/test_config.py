"""config.json into one dataclass: the official fields, class defaults, clear messages."""

import json

import pytest
import torch

from kimi_desk.engine.config import ConfigError, KimiLinearConfig
from kimi_desk.engine.random_checkpoint import kimi_linear_48b_config, tiny_config
from kimi_desk.engine.weights import build_on_meta

# The released checkpoint's config.json (kimi-linear-spec.md §1.1), as the hub serves it.
OFFICIAL_48B = {
    "architectures": ["KimiLinearForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_kimi.KimiLinearConfig", "AutoModel": "modeling_kimi.KimiLinearModel",
                 "AutoModelForCausalLM": "modeling_kimi.KimiLinearForCausalLM"},
    "model_type": "kimi_linear", "dtype": "bfloat16", "vocab_size": 163840, "hidden_size": 2304,
    "num_hidden_layers": 27, "intermediate_size": 9216, "hidden_act": "silu", "rms_norm_eps": 1e-05,
    "initializer_range": 0.02, "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 72,
    "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "mla_use_nope": True, "rope_theta": 10000.0, "rope_scaling": None,
    "linear_attn_config": {"kda_layers": [1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25, 26],
                           "full_attn_layers": [4, 8, 12, 16, 20, 24, 27], "num_heads": 32, "head_dim": 128,
                           "short_conv_kernel_size": 4},
    "num_experts": 256, "num_experts_per_token": 8, "moe_intermediate_size": 1024, "num_shared_experts": 1,
    "first_k_dense_replace": 1, "moe_layer_freq": 1, "moe_renormalize": True,
    "moe_router_activation_func": "sigmoid", "routed_scaling_factor": 2.446, "use_grouped_topk": True,
    "num_expert_group": 1, "topk_group": 1, "num_nextn_predict_layers": 0, "model_max_length": 1048576,
    "tie_word_embeddings": False, "use_cache": True, "bos_token_id": 163584, "eos_token_id": 163586,
    "pad_token_id": 163839, "transformers_version": "4.57.0",
}


def test_official_config_reads_without_unknown_keys():
    config = KimiLinearConfig.from_dict(OFFICIAL_48B)
    assert config.unknown_keys == {}
    assert config == kimi_linear_48b_config()
    kinds = config.layer_kinds
    assert [i for i, k in enumerate(kinds) if k == "mla"] == [3, 7, 11, 15, 19, 23, 26]
    assert kinds.count("kda") == 20
    assert [config.is_moe_layer(i) for i in range(27)] == [False] + [True] * 26
    assert config.mla_latent_size == 576


def test_48b_on_meta_has_49_12_b_parameters():
    model = build_on_meta(KimiLinearConfig.from_dict(OFFICIAL_48B))
    assert sum(p.numel() for p in model.parameters()) == 49_122_681_728
    from kimi_desk.engine.weights import expected_tensors

    assert len(expected_tensors(model)) == 20_493
    assert all(p.device == torch.device("meta") for p in model.parameters())


def test_class_defaults_apply_to_missing_fields():
    raw = tiny_config().to_dict()
    for key in ("rms_norm_eps", "routed_scaling_factor", "num_shared_experts", "first_k_dense_replace"):
        del raw[key]
    config = KimiLinearConfig.from_dict(raw)
    assert config.rms_norm_eps == 1e-6 and config.routed_scaling_factor == 1.0
    assert config.num_shared_experts == 0 and config.first_k_dense_replace == 0


def test_round_trip_through_official_layout():
    config = tiny_config()
    assert KimiLinearConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_unknown_keys_are_reported_not_dropped():
    raw = tiny_config().to_dict()
    raw["some_future_field"] = 3
    raw["linear_attn_config"]["gate_lower_bound"] = -5
    config = KimiLinearConfig.from_dict(raw)
    assert config.unknown_keys == {"some_future_field": 3, "linear_attn_config.gate_lower_bound": -5}


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda c: c.update(model_type="llama"), "model_type is 'llama'"),
        (lambda c: c.update(hidden_size=0), "hidden_size must be a positive integer"),
        (lambda c: c["linear_attn_config"].update(kda_layers=[0, 1, 2]), "1-based"),
        (lambda c: c["linear_attn_config"].update(full_attn_layers=[3, 4]), "both as kda_layers and full_attn_layers"),
        (lambda c: c["linear_attn_config"].update(kda_layers=[1, 2]), "in neither"),
        (lambda c: c["linear_attn_config"].pop("kda_layers"), "needs both kda_layers and full_attn_layers"),
        (lambda c: c.update(moe_router_activation_func="relu"), "moe_router_activation_func"),
        (lambda c: c.update(q_lora_rank=64), "q_lora_rank"),
        (lambda c: c.update(num_experts_per_token=99), "exceeds num_experts"),
        (lambda c: c.update(mla_use_nope=False), "NoPE"),
    ],
)
def test_bad_configs_get_one_clear_message(change, message):
    raw = tiny_config().to_dict()
    change(raw)
    with pytest.raises(ConfigError, match=message) as info:
        KimiLinearConfig.from_dict(raw)
    assert "\n" not in str(info.value)


def test_unreadable_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        KimiLinearConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        KimiLinearConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        KimiLinearConfig.from_file(tmp_path / "config.json")
