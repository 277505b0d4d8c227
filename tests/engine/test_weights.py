"""Loading checkpoints in the official layout: single file, sharded, strict, with clear errors."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kimi_desk.engine import CheckpointError, ConfigError, load_model
from kimi_desk.engine.random_checkpoint import tiny_config, write_random_checkpoint


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_official_tensor_names_and_shapes(tiny_checkpoint):
    """The names and shapes of kimi-linear-spec.md §9 for the tiny config: 151 tensors."""
    with safe_open(tiny_checkpoint / "model.safetensors", framework="pt") as f:
        shapes = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
    assert len(shapes) == 151
    assert shapes["model.layers.0.self_attn.A_log"] == [1, 1, 2, 1]
    assert shapes["model.layers.0.self_attn.q_conv1d.weight"] == [64, 1, 4]
    assert shapes["model.layers.0.self_attn.f_b_proj.weight"] == [64, 32]
    assert shapes["model.layers.0.mlp.down_proj.weight"] == [128, 256]
    assert shapes["model.layers.1.block_sparse_moe.experts.7.w2.weight"] == [128, 32]
    assert shapes["model.layers.1.block_sparse_moe.gate.e_score_correction_bias"] == [8]
    assert shapes["model.layers.2.block_sparse_moe.shared_experts.gate_proj.weight"] == [32, 128]
    assert shapes["model.layers.3.self_attn.kv_a_proj_with_mqa.weight"] == [40, 128]
    assert shapes["model.layers.3.self_attn.kv_b_proj.weight"] == [128, 32]
    assert shapes["lm_head.weight"] == [512, 128]


def test_sharded_equals_single_file(tiny_checkpoint, tmp_path):
    sharded = write_random_checkpoint(tiny_config(), tmp_path / "sharded", seed=1, max_shard_bytes=300_000)
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    assert not (sharded / "model.safetensors").exists()
    a, b = load_model(tiny_checkpoint), load_model(sharded)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name


def test_bfloat16_file_loads_and_keeps_fp32_gates(tmp_path):
    path = write_random_checkpoint(tiny_config(dtype="bfloat16"), tmp_path / "bf16", seed=4)
    model = load_model(path)
    assert model.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.dt_bias.dtype == torch.float32
    logits = model(torch.tensor([[1, 2, 3]]), model.new_state(1))
    assert torch.isfinite(logits).all()


def rewrite_tensors(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "m")
    rewrite_tensors(path, lambda t: t.pop("model.layers.2.self_attn.dt_bias"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.2\.self_attn\.dt_bias$"):
        load_model(path)


def test_unexpected_tensor_is_named(tiny_checkpoint, tmp_path):
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "m")
    rewrite_tensors(path, lambda t: t.update({"model.layers.0.self_attn.g_b_proj.bias": torch.zeros(64)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.self_attn\.g_b_proj\.bias"):
        load_model(path)


def test_misshaped_tensor_is_named(tiny_checkpoint, tmp_path):
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "m")
    rewrite_tensors(path, lambda t: t.update({"model.layers.0.self_attn.A_log": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"A_log has shape \[2\], expected \[1, 1, 2, 1\]"):
        load_model(path)


def test_truncated_safetensors(tiny_checkpoint, tmp_path):
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "m")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(path)
    (path / "model.safetensors").write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        load_model(path)


def test_missing_files(tiny_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        load_model(tmp_path / "nowhere")
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "m")
    (path / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json: no such file"):
        load_model(path)
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "n")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(path)


def test_sharded_index_problems(tmp_path):
    path = write_random_checkpoint(tiny_config(), tmp_path / "s", seed=1, max_shard_bytes=300_000)
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard.name} .* is missing"):
        load_model(path)
    (path / "model.safetensors.index.json").write_text(json.dumps({"nope": 1}))
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        load_model(path)


def test_wrong_config_for_the_weights(tiny_checkpoint, tmp_path):
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "m")
    raw = json.loads((path / "config.json").read_text())
    raw["hidden_size"] = 64
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="has shape .* expected"):
        load_model(path)


def test_pickle_files_are_never_read(tiny_checkpoint, tmp_path):
    """A pytorch_model.bin beside the safetensors is ignored; one alone is refused, never unpickled."""
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "m")
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(path)
