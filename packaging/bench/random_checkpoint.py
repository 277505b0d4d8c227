"""Random checkpoints in the official layout, for tests and benchmarks at any size.

The configs here cover every structural feature: KDA and MLA layers in the checkpoint's 1-based
lists, a dense layer 0, MoE layers with a shared expert, the sigmoid router with a non-zero
correction bias, routed_scaling_factor != 1 (kimi-linear-spec.md §9).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from kimi_desk.engine.config import KimiLinearConfig
from kimi_desk.engine.quantize import format_of, logical_shape, quantize_into, quantize_structure
from kimi_desk.engine.weights import build_on_meta, materialize, save_checkpoint

# The released model's settings that are not sizes (spec §1.1): every config here keeps them, so that the
# small models take the same paths as the real one (shared expert, sigmoid router, scaling factor != 1).
RELEASED_STRUCTURE = dict(
    rms_norm_eps=1e-5,
    mla_use_nope=True,
    short_conv_kernel_size=4,
    num_shared_experts=1,
    first_k_dense_replace=1,
    moe_layer_freq=1,
    moe_renormalize=True,
    moe_router_activation_func="sigmoid",
    routed_scaling_factor=2.446,
)


def tiny_config(**overrides) -> KimiLinearConfig:
    """The spec's 4-layer config: K K K M, dense layer 0."""
    values = dict(
        RELEASED_STRUCTURE,
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        kda_layers=[1, 2, 3],
        full_attn_layers=[4],
        kda_num_heads=2,
        kda_head_dim=32,
        num_experts=8,
        num_experts_per_token=2,
        moe_intermediate_size=32,
        model_max_length=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        dtype="float32",
    )
    values.update(overrides)
    config = KimiLinearConfig(**values)
    config.validate()
    return config


def tail7_config(**overrides) -> KimiLinearConfig:
    """7 layers, K K K M K K M: the real model's irregular K K M tail, KDA state passing an MLA layer."""
    return tiny_config(num_hidden_layers=7, kda_layers=[1, 2, 3, 5, 6], full_attn_layers=[4, 7], **overrides)


def bench_config(**overrides) -> KimiLinearConfig:
    """About 20 M parameters (hidden 256, 8 layers: K K K M K K K M), the CPU benchmark's model."""
    values = dict(
        vocab_size=12288,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=8,
        num_attention_heads=4,
        kv_lora_rank=128,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        kda_layers=[1, 2, 3, 5, 6, 7],
        full_attn_layers=[4, 8],
        kda_num_heads=4,
        kda_head_dim=64,
        num_experts=8,
        num_experts_per_token=2,
        moe_intermediate_size=256,
        model_max_length=1 << 20,
    )
    values.update(overrides)
    return tiny_config(**values)


def kimi_linear_48b_config() -> KimiLinearConfig:
    """The released Kimi-Linear-48B-A3B config (spec §1.1)."""
    kda = [i for i in range(1, 28) if i % 4 != 0 and i != 27]
    return KimiLinearConfig(
        **RELEASED_STRUCTURE,
        vocab_size=163840,
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=27,
        num_attention_heads=32,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        kda_layers=kda,
        full_attn_layers=[4, 8, 12, 16, 20, 24, 27],
        kda_num_heads=32,
        kda_head_dim=128,
        num_experts=256,
        num_experts_per_token=8,
        moe_intermediate_size=1024,
        model_max_length=1048576,
        bos_token_id=163584,
        eos_token_id=163586,
        pad_token_id=163839,
        dtype="bfloat16",
    )


def _initial_value(name: str, shape, uniform, normal) -> torch.Tensor:
    """A parameter's random value as the reference code initialises it (HFM, fla)."""
    if name.endswith("A_log"):
        return uniform(shape, 1, 16).log_()
    if name.endswith("dt_bias"):
        dt = (uniform(shape, 0, 1) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).exp_()
        return dt + torch.log(-torch.expm1(-dt))  # inverse softplus
    if name.endswith("conv1d.weight"):
        bound = 1 / math.sqrt(shape[-1])
        return uniform(shape, -bound, bound)
    if name.endswith("e_score_correction_bias"):
        return normal(shape, 0.1)
    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        # Not all ones, so that a norm weight applied in the wrong place shows.
        return normal(shape, 0.1).add_(1)
    return normal(shape, 0.02)


def random_model(
    config: KimiLinearConfig,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    quantize: str | None = None,
    placement=None,
):
    """A model with random weights drawn as the reference code initialises them (HFM, fla), generated
    on `device` (so that a model at the 48B shapes is drawn on the GPU, not copied there). With
    `quantize`, the quantized matrices are drawn in float32 and stored quantized, as loading would.
    With `placement` (engine/placement.py), the routed experts it keeps in RAM are drawn and quantized
    on `device`, then moved to RAM one at a time."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    model = build_on_meta(config)
    if placement is not None and placement.offloaded:
        from kimi_desk.engine.offload import apply_placement

        apply_placement(model, placement)
    if quantize is not None:
        quantize_structure(model, quantize)
    materialize(model, device, dtype)
    model.quantization = quantize

    def uniform(shape, low, high):
        return torch.empty(shape, device=device).uniform_(low, high, generator=gen)

    def normal(shape, std):
        return torch.randn(shape, generator=gen, device=device).mul_(std)

    for name, param in model.named_parameters():
        if format_of(param) is not None:
            for index in range(param.shape[0]) if ".experts." in name else [None]:
                # One expert at a time: a float32 copy of all 256 experts would not fit beside the model.
                logical = logical_shape(param)
                quantize_into(model, name, index, normal(logical if index is None else logical[1:], 0.02), on=device)
            continue
        value = _initial_value(name, param.shape, uniform, normal)
        param.data.copy_(value)
        del value
    from kimi_desk.engine.offload import finish_offload

    finish_offload(model)
    return model.eval()


def write_random_checkpoint(config: KimiLinearConfig, path, seed: int = 0, max_shard_bytes: int | None = None) -> Path:
    """Write a random checkpoint (config.json + safetensors, sharded if asked) and return its folder."""
    dtype = getattr(torch, config.dtype)
    save_checkpoint(random_model(config, seed=seed, dtype=dtype), path, max_shard_bytes=max_shard_bytes)
    return Path(path)


def write_checkpoint_with_empty_experts(
    config: KimiLinearConfig, path, seed: int = 0, max_shard_bytes: int = 2 * 10**9
) -> Path:
    """Write a checkpoint in the official layout whose routed experts are zeros left as holes in sparse
    safetensors files, everything else random as `random_model` draws it, one tensor at a time.

    The whole 48B model (98 GB in bf16, 95 of them routed experts) then takes about 3 GB of disk and
    never sits in memory while written: what a memory test at the real size needs (loading, the int4
    cache, a token's path through every layer; a router still spreads tokens over all the experts), not
    a quality test. Returns the folder."""
    import json

    from kimi_desk.engine.quantized_cache import safetensors_header
    from kimi_desk.engine.weights import FP32_PARAMETERS, expected_tensors

    model = build_on_meta(config)
    gen = torch.Generator().manual_seed(seed)

    def uniform(shape, low, high):
        return torch.empty(shape).uniform_(low, high, generator=gen)

    def normal(shape, std):
        return torch.randn(shape, generator=gen).mul_(std)

    entries = []  # (checkpoint name, parameter name, shape, dtype)
    for name, (pname, index, shape) in expected_tensors(model).items():
        dtype = torch.float32 if pname.endswith(FP32_PARAMETERS) else getattr(torch, config.dtype)
        entries.append((name, pname, tuple(shape), dtype))
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = math.prod(entry[2]) * entry[3].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, 1):
        fname = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        header, offset = safetensors_header([(name, dtype, shape) for name, _, shape, dtype in shard], {"format": "pt"})
        with open(path / fname, "wb") as f:
            f.write(header)
            for name, pname, shape, dtype in shard:
                nbytes = math.prod(shape) * dtype.itemsize
                if ".experts." in pname:
                    f.seek(nbytes, 1)  # a hole: reads as zeros, takes no disk
                    continue
                value = _initial_value(pname, shape, uniform, normal).to(dtype).contiguous()
                f.write(value.view(torch.uint8).numpy().tobytes())
            f.truncate(f.tell())
        weight_map.update({name: fname for name, *_ in shard})
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    (path / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path


def write_small_tokenizer(folder, base_vocab: int = 700) -> None:
    """A byte-level BPE of `base_vocab` tokens trained on a few of Python's own modules, plus the Kimi
    special tokens after it (ids base_vocab .. base_vocab + 257), as tokenizer.json in `folder`. The
    model beside it needs vocab_size >= base_vocab + 258."""
    import inspect
    import json as json_module
    import textwrap

    from kimi_desk.engine.tokenizer import (
        canonical_json,
        kimi_added_tokens,
        special_token_names,
        tiktoken_to_tokenizer_json,
        train_ranks,
    )

    modules = [json_module, textwrap, inspect]
    texts = [Path(inspect.getsourcefile(m)).read_text(encoding="utf-8") for m in modules]
    ranks = train_ranks(texts, base_vocab)
    names = special_token_names(len(ranks), kimi_added_tokens(len(ranks)))
    (Path(folder) / "tokenizer.json").write_text(
        canonical_json(tiktoken_to_tokenizer_json(ranks, names)), encoding="utf-8"
    )
