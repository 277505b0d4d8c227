"""packaging/bench/random_checkpoint.py's checkpoint with empty experts: the official layout that
load_model and safetensors read, the routed experts zeros that take no disk, the rest random."""

import os

import torch
from safetensors import safe_open

from kimi_desk.bench.random_checkpoint import tiny_config, write_checkpoint_with_empty_experts
from kimi_desk.engine.weights import load_model


def test_empty_experts_load_as_zeros_and_take_no_disk(tmp_path):
    config = tiny_config(num_experts=64, moe_intermediate_size=256)
    write_checkpoint_with_empty_experts(config, tmp_path, max_shard_bytes=1 << 20)
    model = load_model(tmp_path, "cpu", torch.float32)
    experts = {n: p for n, p in model.named_parameters() if ".experts." in n}
    assert experts and all(not p.any() for p in experts.values())
    others = {n: p for n, p in model.named_parameters() if ".experts." not in n and p.numel() > 64}
    assert all(p.std() > 0 for p in others.values())
    logits = model(torch.tensor([[3, 1, 4, 1, 5]]), model.new_state(1))
    assert torch.isfinite(logits).all()

    shards = sorted(tmp_path.glob("*.safetensors"))
    logical = sum(f.stat().st_size for f in shards)
    on_disk = sum(f.stat().st_blocks * 512 for f in shards)
    expert_bytes = sum(p.numel() * 4 for p in experts.values())  # float32 tiny config
    assert on_disk < logical - expert_bytes // 2, (on_disk, logical)  # the holes hold no blocks
    with safe_open(shards[-1], framework="pt") as reader:  # safetensors' own reader agrees
        assert all(reader.get_tensor(k).shape for k in reader.keys())
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
