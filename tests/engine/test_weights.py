"""Loading checkpoints in the official layout: single file, sharded, strict, with clear errors."""

import json
import random
import shutil
import struct
import tracemalloc
from collections import Counter

import pytest
import torch
from fuzzing import check_case, mutate_bytes, mutate_json, tree_state
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kimi_desk.bench.random_checkpoint import tiny_config, write_random_checkpoint
from kimi_desk.engine import CheckpointError, ConfigError, load_model


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


def rewrite_header(file, edit):
    """Rewrite a safetensors file's header JSON through `edit` (which may return a replacement, or bytes),
    keeping the tensor data as it is."""
    data = file.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    new = edit(header)
    new = header if new is None else new
    text = new if isinstance(new, bytes) else json.dumps(new).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])


def one_line_refusal(path, error=CheckpointError, match=None) -> str:
    with pytest.raises(error, match=match) as info:
        load_model(path)
    text = str(info.value)
    assert "\n" not in text and len(text) < 400, text[:500]
    return text


@pytest.mark.parametrize("claimed", [64 << 20, 3 << 30])
def test_a_huge_header_claim_is_refused_without_reading_it(tiny_checkpoint, tmp_path, claimed):
    """The header length comes from the file: trusted, a file claiming gigabytes makes the loader
    allocate them."""
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "m")
    file = path / "model.safetensors"
    with open(file, "wb") as fh:  # sparse: as long as its claim, and nothing on disk
        fh.write(struct.pack("<Q", claimed) + b"{")
        fh.truncate(8 + claimed + 100)
    tracemalloc.start()
    try:
        text = one_line_refusal(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(file) in text and f"its header claims {claimed:,} bytes" in text
    assert peak < 8 << 20


def first_tensor(edit=None, becomes=None):
    """An edit of the header's first tensor entry: `edit(entry)` changes it, or it `becomes` another value."""

    def apply(header):
        name = next(k for k in header if k != "__metadata__")
        if edit is not None:
            edit(header[name])
        else:
            header[name] = becomes

    return apply


@pytest.mark.parametrize(
    "edit,message",
    [
        pytest.param(
            first_tensor(lambda e: e.pop("data_offsets")), "has data_offsets None, not [begin, end]", id="no-offsets"
        ),
        pytest.param(
            first_tensor(lambda e: e.update(data_offsets=["0", "8"])), "has data_offsets", id="string-offsets"
        ),
        pytest.param(first_tensor(lambda e: e.update(data_offsets=[8, 0])), "not [begin, end]", id="reversed-offsets"),
        pytest.param(first_tensor(lambda e: e.update(data_offsets=[0, 1 << 60])), "truncated", id="offsets-past-end"),
        pytest.param(first_tensor(lambda e: e.update(data_offsets=[0, 10**400])), "truncated", id="huge-offset"),
        pytest.param(first_tensor(lambda e: e.update(data_offsets=[0, 4, 8])), "has data_offsets", id="three-offsets"),
        pytest.param(first_tensor(lambda e: e.update(shape=[-1])), "not a list of at most 8 sizes", id="negative-dim"),
        pytest.param(first_tensor(lambda e: e.update(shape=[True])), "has shape", id="bool-dim"),
        pytest.param(
            first_tensor(lambda e: e.update(shape=[1] * 100)), "not a list of at most 8 sizes", id="many-dims"
        ),
        pytest.param(
            first_tensor(lambda e: e.update(shape=[1 << 40, 1 << 40])),
            "not the size of its shape in F32",
            id="big-shape",
        ),
        pytest.param(first_tensor(lambda e: e.update(dtype=4)), "has dtype 4", id="int-dtype"),
        pytest.param(first_tensor(lambda e: e.pop("dtype")), "has dtype None", id="no-dtype"),
        pytest.param(first_tensor(becomes=[1, 2]), "is a list of 2 items, not an object", id="entry-list"),
        pytest.param(lambda h: [h], "not a JSON object", id="header-list"),
        pytest.param(lambda h: b"[" * 100_000, "not JSON", id="deep-nesting"),
        pytest.param(lambda h: b"\xff\xfe{}", "not JSON", id="not-utf8"),
        pytest.param(
            lambda h: {**h, "x" * 100_000 + "\n": {"dtype": "F32", "shape": [], "data_offsets": "?"}},
            "tensor 'xxxxxxxxx",
            id="long-name",
        ),
    ],
)
def test_header_structure_is_checked_before_use(tiny_checkpoint, tmp_path, edit, message):
    """Every entry an object with dtype, shape and data_offsets of the right types, inside the file."""
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "m")
    rewrite_header(path / "model.safetensors", edit)
    text = one_line_refusal(path)
    assert text.startswith(str(path / "model.safetensors")) and message in text, text


def test_integer_tensors_and_odd_expert_names_are_refused(tiny_checkpoint, tmp_path):
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "m")
    rewrite_tensors(
        path, lambda t: t.update({"model.layers.0.self_attn.A_log": torch.zeros(1, 1, 2, 1, dtype=torch.int32)})
    )
    one_line_refusal(path, match=r"A_log has dtype 'I32', expected floating point")
    for odd in ("experts.07.w1.weight", "experts.8.w1.weight", "experts.x.weight", "experts.w1"):
        path = copy_checkpoint(tiny_checkpoint, tmp_path / odd)
        name = f"model.layers.1.block_sparse_moe.{odd}"
        rewrite_tensors(path, lambda t: t.update({name: torch.zeros(32, 128)}))
        one_line_refusal(path, match=rf"unexpected tensor {name}")


@pytest.mark.parametrize(
    "shard,message",
    [
        ("../outside.safetensors", "'../outside.safetensors', not a .safetensors file in its folder"),
        ("{outside}", "not a .safetensors file in its folder"),
        (7, "the index names 7"),
        (["model.safetensors"], "the index names a list of 1 item"),
        ("model.bin", "the index names 'model.bin'"),
    ],
)
def test_index_names_only_shards_in_the_folder(tiny_checkpoint, tmp_path, shard, message):
    """A shard named ../x or /x must not load a file outside the checkpoint folder (here a whole valid
    checkpoint, which would load)."""
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "m")
    outside = tmp_path / "outside.safetensors"
    (path / "model.safetensors").rename(outside)
    shard = str(outside) if shard == "{outside}" else shard
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))
    text = one_line_refusal(path)
    assert text.startswith(str(path / "model.safetensors.index.json")) and message in text, text


def test_damaged_index_is_one_line(tiny_checkpoint, tmp_path):
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "m")
    index = path / "model.safetensors.index.json"
    for text, message in [
        ("[" * 100_000, "nested too deeply"),
        ('{"weight_map": []}', "needs a weight_map object"),
        ('{"weight_map": {}}', "needs a weight_map object"),
        ("\ufeff{", "not valid JSON"),
    ]:
        index.write_text(text)
        assert message in one_line_refusal(path)


def test_a_config_far_larger_than_its_weights_is_refused_before_allocating(tiny_checkpoint, tmp_path):
    """Sizes within the config's bounds can still describe terabytes: the headers are checked against
    the model on the meta device first, so nothing is allocated for a model the files do not hold."""
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "m")
    raw = json.loads((path / "config.json").read_text())
    raw.update(vocab_size=1 << 24, hidden_size=1 << 16)  # 2^40 embedding parameters alone
    (path / "config.json").write_text(json.dumps(raw))
    one_line_refusal(path, match=r"has shape \[.*\], expected \[.*65536")


def test_fuzzed_safetensors_end_in_a_model_or_one_line(tiny_checkpoint, tmp_path):
    """Mutations of the header's JSON, of the header's bytes and of the whole file: each load ends in a
    model or in one CheckpointError line; never another exception, a hang or a write."""
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "m")
    original = (path / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", original[:8])
    header, data = json.loads(original[8 : 8 + length]), original[8 + length :]
    files = tree_state(tmp_path, skip=path)
    outcomes = Counter()
    for seed in range(150):
        rng = random.Random(seed)
        kind = rng.choice(["header json", "header json", "header bytes", "file bytes"])
        if kind == "header json":
            text, what = mutate_json(header, rng)
            mutated = struct.pack("<Q", len(text.encode())) + text.encode() + data
        elif kind == "header bytes":
            head, what = mutate_bytes(original[: 8 + length], rng)
            mutated = head + data
        else:
            mutated, what = mutate_bytes(original, rng)
        (path / "model.safetensors").write_bytes(mutated)
        outcomes[check_case(lambda: load_model(path), CheckpointError, seed, f"{kind}: {what}")] += 1
    assert tree_state(tmp_path, skip=path) == files
    assert outcomes["ok"] >= 10 and outcomes["refused"] >= 75, outcomes
