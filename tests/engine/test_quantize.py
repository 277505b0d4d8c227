"""Weight-only fp8 at load time: which tensors, the loaded model against the same model computed with
the dequantized weights in float32 (an independent path through plain PyTorch), memory, and the
commands' --quantize."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kimi_desk.bench.random_checkpoint import kimi_linear_48b_config
from kimi_desk.engine import load_model
from kimi_desk.engine.quantize import RowScaledLinear, is_quantized_weight
from kimi_desk.engine.weights import build_on_meta, save_checkpoint
from kimi_desk.kernels.quant import FP8
from kimi_desk.kernels.quant.naive import dequantize_rows_torch as dequantize_rows
from kimi_desk.kernels.quant.naive import quantize_fp8_rows


def test_the_rule_covers_the_big_matrices_only():
    names = [name for name, _ in build_on_meta(kimi_linear_48b_config()).named_parameters()]
    quantized = [n for n in names if is_quantized_weight(n)]
    assert not any(
        "embed_tokens" in n
        or "lm_head" in n
        or "norm" in n
        or "kv_b_proj" in n
        or n.endswith((".gate.weight", "A_log", "dt_bias", "conv1d.weight", "e_score_correction_bias"))
        for n in quantized
    )
    for needed in (
        "self_attn.q_proj.weight",
        "self_attn.kv_a_proj_with_mqa.weight",
        "self_attn.o_proj.weight",
        "self_attn.f_b_proj.weight",
        "mlp.gate_proj.weight",
        "shared_experts.down_proj.weight",
        "experts.w1",
        "experts.w2",
        "experts.w3",
    ):
        assert any(n.endswith(needed) for n in quantized), needed
    model = build_on_meta(kimi_linear_48b_config())
    total = sum(p.numel() for p in model.parameters())
    share = sum(p.numel() for n, p in model.named_parameters() if is_quantized_weight(n)) / total
    assert 0.97 < share < 0.995  # all but the embedding, the head and kv_b_proj


@pytest.mark.parametrize("checkpoint_fixture", ["tiny_checkpoint", "tail7_checkpoint"])
def test_fp8_model_equals_the_model_with_dequantized_weights(checkpoint_fixture, request):
    checkpoint = request.getfixturevalue(checkpoint_fixture)
    quantized = load_model(checkpoint, dtype=torch.float32, quantize="fp8")
    reference = load_model(checkpoint, dtype=torch.float32)
    exact = load_model(checkpoint, dtype=torch.float32)
    for name, param in reference.named_parameters():
        if is_quantized_weight(name):
            assert dict(quantized.named_parameters())[name].dtype == FP8
            param.data.copy_(dequantize_rows(*quantize_fp8_rows(param.data), torch.float32))
    assert any(isinstance(m, RowScaledLinear) for m in quantized.modules())

    ids = torch.randint(0, reference.config.vocab_size, (2, 70))
    got = quantized(ids, quantized.new_state(2))
    want = reference(ids, reference.new_state(2))
    assert ((got - want).norm() / want.norm()) < 1e-5
    # The error fp8 itself makes against the unquantized weights: not zero, and bounded. Random weights
    # have no structure to keep (3 mantissa bits: 2.6% per weight, compounded over the layers).
    full = exact(ids, exact.new_state(2))
    error = ((got - full).norm() / full.norm()).item()
    assert 1e-5 < error < 0.2

    # Decode through the same model hands over the state as prefill does.
    state = quantized.new_state(2)
    parts = [quantized(ids[:, :50], state)] + [quantized(ids[:, t : t + 1], state) for t in range(50, 70)]
    assert ((torch.cat(parts, 1) - got).norm() / got.norm()) < 1e-5


def test_fp8_halves_the_weight_bytes_and_is_not_saved(tail7_checkpoint, tmp_path):
    full = load_model(tail7_checkpoint, dtype=torch.bfloat16)
    fp8 = load_model(tail7_checkpoint, dtype=torch.bfloat16, quantize="fp8")

    def nbytes(model):
        return sum(t.nbytes for t in list(model.parameters()) + list(model.buffers()))

    big = sum(p.nbytes for n, p in full.named_parameters() if is_quantized_weight(n))
    assert nbytes(full) - nbytes(fp8) > 0.45 * big
    with pytest.raises(ValueError, match="quantized model is not saved"):
        save_checkpoint(fp8, tmp_path / "out")


def test_fp8_linear_module_matches_its_formula():
    layer = RowScaledLinear(48, 20)
    w = torch.randn(20, 48)
    q, s = quantize_fp8_rows(w)
    layer.weight.data.copy_(q)
    layer.weight_scale.copy_(s)
    x = torch.randn(3, 5, 48)
    want = F.linear(x.double(), (q.double() * s.double()[:, None]))
    assert torch.allclose(layer(x).double(), want, rtol=1e-5, atol=1e-5)


def test_fp8_keeps_a_trained_models_predictions():
    """On the shipped demo model and real text: the loss moves by well under 1%, most argmaxes stay."""
    from kimi_desk.engine.loading import DEMO_MODEL
    from kimi_desk.engine.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(DEMO_MODEL)
    text = (Path(__file__).parents[2] / "engine" / "session.py").read_text(encoding="utf-8")
    ids = torch.tensor([tokenizer.encode(text, allow_special=False)[:512]])
    full = load_model(DEMO_MODEL, dtype=torch.float32)
    fp8 = load_model(DEMO_MODEL, dtype=torch.float32, quantize="fp8")
    want, got = full(ids, full.new_state(1)), fp8(ids, fp8.new_state(1))
    loss_full = F.cross_entropy(want[0, :-1], ids[0, 1:]).item()
    loss_fp8 = F.cross_entropy(got[0, :-1], ids[0, 1:]).item()
    assert abs(loss_fp8 / loss_full - 1) < 0.01
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.85


def test_int4_keeps_the_embedding_in_int8_and_the_head_in_finer_groups():
    from kimi_desk.engine.quantize import HEAD_INT4_GROUP, int4_group, weight_format

    assert weight_format("lm_head.weight", "int4") == "int4" and int4_group("lm_head.weight", 2304) == HEAD_INT4_GROUP
    assert weight_format("lm_head.weight", "int8") == "int8"
    assert weight_format("model.embed_tokens.weight", "int4") == "int8"
    assert weight_format("lm_head.weight", "fp8") is None
    assert int4_group("model.layers.1.mlp.experts.w1", 2304) == 128


@pytest.mark.parametrize(
    "name,want",
    [
        ("model.layers.1.self_attn.q_proj.weight", "int8"),
        ("model.layers.1.self_attn.k_proj.weight", "int8"),
        ("model.layers.1.self_attn.f_a_proj.weight", "int8"),
        ("model.layers.0.mlp.gate_proj.weight", "int8"),
        ("model.layers.0.mlp.down_proj.weight", "int8"),
        ("model.layers.1.self_attn.v_proj.weight", "int4"),
        ("model.layers.1.self_attn.o_proj.weight", "int4"),
        ("model.layers.3.self_attn.kv_a_proj_with_mqa.weight", "int4"),
        ("model.layers.1.block_sparse_moe.shared_experts.gate_proj.weight", "int4"),
        ("model.layers.1.block_sparse_moe.experts.0.w1.weight", "int4"),
    ],
)
def test_int4_keeps_the_sensitive_projections_in_int8(name, want):
    """Under int4: KDA's gates and beta, the attention's queries and keys and the dense MLP take int8;
    values, outputs, latents, shared and routed experts int4. Under int8 everything is int8."""
    from kimi_desk.engine.quantize import weight_format

    assert weight_format(name, "int4") == want
    assert weight_format(name, "int8") == "int8"


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_int_models_equal_the_model_with_dequantized_weights(tail7_checkpoint, method):
    """int8 and int4 (the CPU's kernels: int4 rounds each product's activations to int8) against the same
    model computed in float32 with every weight replaced by its dequantized codes, each in the format and
    group the rule gives it."""
    from kimi_desk.engine.quantize import int4_group, weight_format
    from kimi_desk.engine.weights import FP32_PARAMETERS
    from kimi_desk.kernels.quant import dequantize_int4_groups, quantize_int4_groups, quantize_int8_rows

    quantized = load_model(tail7_checkpoint, dtype=torch.float32, quantize=method)
    from kimi_desk.engine.quantize import prepare_for_cpu

    prepare_for_cpu(quantized)
    reference = load_model(tail7_checkpoint, dtype=torch.float32)
    for name, param in reference.named_parameters():
        fmt = weight_format(name, method)
        if fmt == "int4":
            group = int4_group(name, param.shape[-1])
            param.data.copy_(dequantize_int4_groups(*quantize_int4_groups(param.data, group), torch.float32))
        elif fmt == "int8" and not name.endswith(FP32_PARAMETERS):
            param.data.copy_(dequantize_rows(*quantize_int8_rows(param.data), torch.float32))
    ids = torch.randint(0, reference.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(3))
    got = quantized(ids, quantized.new_state(1))
    want = reference(ids, reference.new_state(1))
    # Random weights amplify every rounding: on this model the activations' rounding (int8 in the CPU's
    # int4 kernels, bf16 in PyTorch's int4 operator) moves the logits 2-6% with the ids, where int4
    # itself is ~55% from the unquantized weights (and a wrong code or group would be as far).
    assert ((got - want).norm() / want.norm()) < (0.15 if method == "int4" else 2e-3)


def test_quantized_models_on_a_float32_cpu_keep_their_cache_in_bfloat16(tmp_path):
    """A bf16 checkpoint quantized and computed in float32 on the CPU: the MLA caches are bf16 (half the
    bytes a long context holds and reads), the KDA states float32, and the logits of a read and of decode
    steps stay those of the same model with a float32 cache; unquantized, the cache stays float32."""
    from kimi_desk.bench.random_checkpoint import tiny_config, write_random_checkpoint
    from kimi_desk.engine.memory import estimate_memory
    from kimi_desk.engine.state import MLACache

    config = tiny_config(dtype="bfloat16")
    checkpoint = write_random_checkpoint(config, tmp_path / "model", seed=4)
    model = load_model(checkpoint, dtype=torch.float32, quantize="int8")
    assert model.cache_dtype == torch.bfloat16
    assert load_model(checkpoint, dtype=torch.float32).new_state(1).layers[-1].buffer.dtype == torch.float32
    ids = torch.randint(0, config.vocab_size, (1, 300), generator=torch.Generator().manual_seed(5))

    def logits(cache_dtype):
        model.cache_dtype = cache_dtype
        state = model.new_state(1)
        caches = [layer for layer in state.layers if isinstance(layer, MLACache)]
        assert caches and all(c.buffer.dtype == (cache_dtype or torch.float32) for c in caches)
        read = model(ids[:, :296], state)[:, -1]
        steps = [model(ids[:, i : i + 1], state)[:, -1] for i in range(296, 300)]
        return torch.cat([read, *steps])

    half, full = logits(torch.bfloat16), logits(None)
    assert ((half - full).norm() / full.norm()) < 1e-3
    int8 = estimate_memory(config, "float32", "int8", context_tokens=1000)
    none = estimate_memory(config, "float32", None, context_tokens=1000)
    assert int8["mla_cache_bytes"] * 2 == none["mla_cache_bytes"]


@pytest.mark.parametrize("method", ["fp8", "int8", "int4"])
def test_a_matrix_is_quantized_in_blocks_of_rows_as_if_whole(method, monkeypatch):
    """quantize_into bounds its temporaries by quantizing blocks of rows; every format scales rows on
    their own, so the codes and scales equal kernels/quant/naive.py's on the whole matrix."""
    from kimi_desk.bench.random_checkpoint import tiny_config
    from kimi_desk.engine import quantize as quantize_module
    from kimi_desk.engine.weights import materialize
    from kimi_desk.kernels.quant.naive import quantize_int4_groups, quantize_int8_rows

    model = build_on_meta(tiny_config())
    quantize_module.quantize_structure(model, method)
    materialize(model, "cpu", torch.float32)
    name, codes = max(
        ((n, p) for n, p in model.named_parameters() if quantize_module.format_of(p) == method and p.dim() == 2),
        key=lambda item: item[1].shape[0],
    )
    parts = quantize_module.sidecars(model, name)
    weight = torch.randn(quantize_module.logical_shape(codes)) * 0.02
    monkeypatch.setattr(quantize_module, "QUANTIZE_ROWS_PER_BLOCK", 7)  # blocks that do not divide the rows
    quantize_module.quantize_into(model, name, None, weight)
    whole = {
        "fp8": lambda w: quantize_fp8_rows(w),
        "int8": lambda w: quantize_int8_rows(w),
        "int4": lambda w: quantize_int4_groups(w, w.shape[-1] // parts[0].shape[-1]),
    }[method](weight)
    for got, want in zip((codes.data, *parts), whole, strict=True):
        assert torch.equal(got.float(), want.float())
