"""config.json into one dataclass: the official fields, class defaults, clear messages."""

import dataclasses
import json
import random
import tracemalloc
from collections import Counter

import pytest
import torch
from fuzzing import check_case, mutate_bytes, mutate_json

from kimi_desk.bench.random_checkpoint import kimi_linear_48b_config, tiny_config
from kimi_desk.engine.config import FIELD_KINDS, ConfigError, KimiLinearConfig
from kimi_desk.engine.weights import build_on_meta

# The released checkpoint's config.json (kimi-linear-spec.md §1.1), as the hub serves it.
OFFICIAL_48B = {
    "architectures": ["KimiLinearForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_kimi.KimiLinearConfig",
        "AutoModel": "modeling_kimi.KimiLinearModel",
        "AutoModelForCausalLM": "modeling_kimi.KimiLinearForCausalLM",
    },
    "model_type": "kimi_linear",
    "dtype": "bfloat16",
    "vocab_size": 163840,
    "hidden_size": 2304,
    "num_hidden_layers": 27,
    "intermediate_size": 9216,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-05,
    "initializer_range": 0.02,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "head_dim": 72,
    "q_lora_rank": None,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "mla_use_nope": True,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "linear_attn_config": {
        "kda_layers": [1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25, 26],
        "full_attn_layers": [4, 8, 12, 16, 20, 24, 27],
        "num_heads": 32,
        "head_dim": 128,
        "short_conv_kernel_size": 4,
    },
    "num_experts": 256,
    "num_experts_per_token": 8,
    "moe_intermediate_size": 1024,
    "num_shared_experts": 1,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "moe_renormalize": True,
    "moe_router_activation_func": "sigmoid",
    "routed_scaling_factor": 2.446,
    "use_grouped_topk": True,
    "num_expert_group": 1,
    "topk_group": 1,
    "num_nextn_predict_layers": 0,
    "model_max_length": 1048576,
    "tie_word_embeddings": False,
    "use_cache": True,
    "bos_token_id": 163584,
    "eos_token_id": 163586,
    "pad_token_id": 163839,
    "transformers_version": "4.57.0",
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
        (lambda c: c.update(hidden_size=0), "hidden_size must be an integer from 1 to 1,048,576, got 0"),
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


def write_config(folder, raw, text=None):
    path = folder / "config.json"
    path.write_text(text if text is not None else json.dumps(raw))
    return path


def refused(path) -> str:
    """The one-line ConfigError that reading `path` gives, read within a small memory allowance."""
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as info:
            KimiLinearConfig.from_file(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    text = str(info.value)
    assert "\n" not in text and len(text) < 300, text[:500]
    assert peak < 16 << 20, f"{peak:,} bytes to refuse {path.name}"
    return text


def test_every_field_has_a_kind_and_bounds():
    fields = {f.name for f in dataclasses.fields(KimiLinearConfig)} - {"unknown_keys"}
    assert set(FIELD_KINDS) == fields


@pytest.mark.parametrize(
    "change,message",
    [
        # 10**7 layers: unbounded, validate would list ten million uncovered layers and print them (89 MB).
        pytest.param(
            lambda c: c.update(num_hidden_layers=10**7),
            "num_hidden_layers must be an integer from 1 to 4,096",
            id="layers-10^7",
        ),
        pytest.param(
            lambda c: c.update(vocab_size=1 << 40), "vocab_size must be an integer from 1 to 16,777,216", id="vocab"
        ),
        pytest.param(lambda c: c.update(hidden_size=1 << 21), "hidden_size must be", id="hidden"),
        pytest.param(
            lambda c: c.update(num_experts=1 << 20),
            "num_experts must be null or an integer from 1 to 65,536",
            id="experts",
        ),
        pytest.param(lambda c: c.update(model_max_length=1 << 40), "model_max_length must be", id="context"),
        pytest.param(lambda c: c.update(num_attention_heads=10**30), "num_attention_heads must be", id="heads"),
        pytest.param(
            lambda c: c.update(routed_scaling_factor=1e300),
            "routed_scaling_factor must be a number in (0, 1e+06)",
            id="scaling",
        ),
        pytest.param(
            lambda c: c["linear_attn_config"].update(kda_layers=list(range(1, 100_001))),
            "linear_attn_config.kda_layers must be a list of at most 4,096 layer numbers (integers), "
            "got a list of 100000",
            id="layer-list",
        ),
        pytest.param(lambda c: c.update(eos_token_id=list(range(100_000))), "eos_token_id must be", id="eos-list"),
        pytest.param(
            lambda c: c.update(num_hidden_layers=4000),
            "layers [5, 6, 7, 8, 9, 10, 11, 12, ... (3996 in all)] are in neither",
            id="uncovered-layers",
        ),
        pytest.param(
            lambda c: c["linear_attn_config"].update(kda_layers=list(range(-3000, 0))),
            "kda_layers has [-3000, -2999, -2998, -2997, -2996, -2995, -2994, -2993, ... (3000 in all)]: "
            "layer numbers are 1-based",
            id="bad-layer-numbers",
        ),
    ],
)
def test_sizes_beyond_any_real_model_are_refused_in_one_short_line(tmp_path, change, message):
    raw = tiny_config().to_dict()
    change(raw)
    assert message in refused(write_config(tmp_path, raw))


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("num_shared_experts", -1, "num_shared_experts must be an integer from 0 to 65,536, got -1"),
        ("first_k_dense_replace", -2, "first_k_dense_replace must be an integer from 0"),
        ("hidden_size", "128", "hidden_size must be an integer from 1 to 1,048,576, got '128'"),
        ("hidden_size", 128.0, "got 128.0"),
        ("hidden_size", True, "got True"),
        ("num_hidden_layers", None, "num_hidden_layers must be an integer"),
        ("num_experts", "8", "num_experts must be null or an integer"),
        ("num_experts", False, "got False"),
        ("rms_norm_eps", "1e-5", "rms_norm_eps must be a number in (0, 1), got '1e-5'"),
        ("rms_norm_eps", float("nan"), "got nan"),
        ("routed_scaling_factor", float("inf"), "got inf"),
        ("routed_scaling_factor", 10**400, "routed_scaling_factor must be a number"),
        ("routed_scaling_factor", [2.4], "got a list of 1 item"),
        ("mla_use_nope", "yes", "mla_use_nope must be true or false, got 'yes'"),
        ("mla_use_nope", 1, "got 1"),
        ("tie_word_embeddings", None, "tie_word_embeddings must be true or false"),
        ("dtype", 16, "dtype must be 'bfloat16' or 'float16' or 'float32', got 16"),
        ("hidden_act", "gelu", "hidden_act must be 'silu', got 'gelu'"),
        ("moe_router_activation_func", ["sigmoid"], "moe_router_activation_func must be 'sigmoid' or 'softmax'"),
        ("eos_token_id", {"id": 2}, "eos_token_id must be null or a token id or a list of at most 256"),
        ("eos_token_id", [2, "3"], "eos_token_id must be"),
        ("eos_token_id", -1, "eos_token_id must be"),
        ("bos_token_id", 1.0, "bos_token_id must be null or an integer from 0 to 16,777,215, got 1.0"),
        ("pad_token_id", [0], "pad_token_id must be"),
        ("q_lora_rank", "64", "q_lora_rank must be null or an integer"),
        ("model_type", {"name": "kimi_linear" * 1000}, "model_type is an object of 1 key, expected 'kimi_linear'"),
        ("model_type", "x" * 10_000, "model_type is 'xxxxxxx"),
        ("linear_attn_config", [1, 2], "linear_attn_config must be an object"),
        ("linear_attn_config.num_heads", 0, "linear_attn_config.num_heads must be an integer from 1 to 65,536, got 0"),
        ("linear_attn_config.head_dim", "32", "linear_attn_config.head_dim must be"),
        ("linear_attn_config.short_conv_kernel_size", -4, "linear_attn_config.short_conv_kernel_size must be"),
        ("linear_attn_config.kda_layers", ["1", "2", "3"], "linear_attn_config.kda_layers must be a list of"),
        ("linear_attn_config.kda_layers", [1.0, 2.0, 3.0], "got a list of 3 items"),
        ("linear_attn_config.full_attn_layers", {"4": True}, "linear_attn_config.full_attn_layers must be"),
        ("linear_attn_config.full_attn_layers", [True], "linear_attn_config.full_attn_layers must be"),
    ],
    ids=lambda v: str(v)[:24] if not isinstance(v, str) else None,
)
def test_malformed_values_are_one_line_errors(tmp_path, key, value, message):
    """Every field is type-checked and bounded: none of these may pass, or fail with another exception."""
    raw = tiny_config().to_dict()
    where, _, leaf = key.rpartition(".")
    (raw[where] if where else raw)[leaf] = value
    text = refused(write_config(tmp_path, raw))
    assert text.startswith("config.json: ") and message in text, text


@pytest.mark.parametrize(
    "name,text,message",
    [
        (
            "deep nesting",
            '{"hidden_size": ' + "[" * 100_000 + "]" * 100_000 + "}",
            "not valid JSON (nested too deeply)",
        ),
        ("a 5000-digit number", '{"hidden_size": 1' + "0" * 5000 + "}", "not valid JSON (Exceeds the limit"),
        ("megabytes of it", '{"hidden_size": 128' + " " * (2 << 20) + "}", "larger than 1,048,576 bytes"),
        ("not UTF-8", '{"model_type": "\udcff"}', "not valid JSON"),
    ],
)
def test_unparseable_config_is_one_line(tmp_path, name, text, message):
    path = tmp_path / "config.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    assert message in refused(path)


def test_a_folder_named_config_json_is_one_line(tmp_path):
    (tmp_path / "config.json").mkdir()
    assert "config.json: cannot be read" in refused(tmp_path / "config.json")


def test_duplicate_keys_take_the_last_value(tmp_path):
    raw = tiny_config().to_dict()
    text = json.dumps(raw)[:-1] + ', "hidden_size": 64}'
    assert KimiLinearConfig.from_file(write_config(tmp_path, raw, text)).hidden_size == 64


def test_fuzzed_config_files_end_in_a_config_or_one_line(tmp_path):
    """Mutations of the tiny and the 48B config.json: each read ends in a config that builds on the meta
    device, or in one ConfigError line; never another exception or a hang."""
    documents = [tiny_config().to_dict(), OFFICIAL_48B]
    path = tmp_path / "config.json"
    outcomes = Counter()
    for seed in range(200):
        rng = random.Random(seed)
        document = rng.choice(documents)
        if rng.random() < 0.3:
            data, what = mutate_bytes(json.dumps(document).encode(), rng)
        else:
            text, what = mutate_json(document, rng)
            data = text.encode()
        path.write_bytes(data)
        outcomes[check_case(lambda: build_on_meta(KimiLinearConfig.from_file(path)), ConfigError, seed, what)] += 1
    # The mutations reach both ends: configs that still read, and each kind of refusal.
    assert outcomes["ok"] >= 20 and outcomes["refused"] >= 100, outcomes
