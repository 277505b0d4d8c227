"""Routed experts split between the "GPU side" and RAM, both on the CPU here: the same logits as the
whole model, at decode (RAM experts computed on the CPU) and at prefill (streamed into staging slots),
in float32 and int4; the quantized cache and the state are the same under any placement."""

import pytest
import torch

from kimi_desk.bench.random_checkpoint import tail7_config, write_random_checkpoint
from kimi_desk.engine import offload
from kimi_desk.engine.offload import OffloadedExperts
from kimi_desk.engine.placement import Placement, staging_experts
from kimi_desk.engine.weights import load_model
from kimi_desk.kernels.moe.naive import streamed_experts_torch

# Per MoE layer (1..6), the experts on the GPU side: none, half, a scattered few, one, most, all.
GPU_EXPERTS = {1: (), 2: (0, 1, 2, 3), 3: (1, 4, 6), 4: (5,), 5: (0, 1, 2, 3, 4, 6, 7), 6: tuple(range(8))}
OTHER_EXPERTS = {1: (7,), 2: (), 3: (0, 2, 3, 5, 7), 4: tuple(range(8)), 5: (2, 3), 6: (0, 1, 2)}


def plan(gpu_experts) -> Placement:
    return Placement(num_experts=8, gpu_experts=gpu_experts, fixed_bytes=0, expert_bytes=1, staging_bytes=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # Experts of 64 x 128 and 128 x 64: whole tiles of the CPU int4 operator (64 rows).
    return write_random_checkpoint(tail7_config(moe_intermediate_size=64), tmp_path_factory.mktemp("off") / "m", seed=4)


def run(model, ids, prefill: int):
    """Logits of a prefill of `prefill` tokens, then one token at a time."""
    state = model.new_state(1)
    parts = [model(ids[:, :prefill], state)] + [model(ids[:, t : t + 1], state) for t in range(prefill, ids.shape[1])]
    return torch.cat(parts, 1), state


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# Two placements of one float32 model agree to this: the int8 output head multiplies its input in bf16
# (kernels/quant/cpu.py), so inputs 1e-7 apart (sums taken in another order) can round apart there.
AGREE = 1e-4


@pytest.fixture(scope="module")
def ids(checkpoint):
    return torch.randint(0, 512, (1, 72), generator=torch.Generator().manual_seed(11))


def test_the_split_model_computes_the_whole_models_logits_fp32(checkpoint, ids):
    whole = load_model(checkpoint, dtype=torch.float32)
    split = load_model(checkpoint, dtype=torch.float32, placement=plan(GPU_EXPERTS))
    layers = offload.offloaded_layers(split)
    assert len(layers) == 5  # layer 6 has every expert on the GPU side and stays whole
    assert split.offload is not None and whole.offload is None
    want, _ = run(whole, ids, 60)
    got, _ = run(split, ids, 60)
    assert torch.isfinite(got).all() and rel(got, want) < AGREE
    stats = split.offload.stats
    assert stats.streamed_calls == 5 and stats.decode_calls == 5 * 12 and stats.streamed_bytes > 0
    # A short prefill chunk takes the decode path (CPU products of the RAM experts), a long one streams.
    split.offload.stats.reset()
    short_want, _ = run(whole, ids[:, :20], 20)
    short_got, _ = run(split, ids[:, :20], 20)
    assert rel(short_got, short_want) < AGREE and split.offload.stats.decode_calls == 5
    assert split.offload.stats.streamed_calls == 0


def test_the_split_model_in_int4(checkpoint, ids):
    whole = load_model(checkpoint, dtype=torch.float32, quantize="int4")
    split = load_model(checkpoint, dtype=torch.float32, quantize="int4", placement=plan(GPU_EXPERTS))
    # The RAM halves hold the CPU operator's tiles only.
    for layer in offload.offloaded_layers(split):
        assert layer.in_ram.w1.numel() == 0 and layer.in_ram.tiles["w13"][0].dtype == torch.uint8
        assert len(layer.in_ram.cpu_weights) == len(layer.ram_ids)
    state_whole, state_split = whole.new_state(1), split.new_state(1)
    # Prefill streams the tiles back into our layout: the same codes, the same products.
    prefill_want = whole(ids[:, :60], state_whole)
    prefill_got = split(ids[:, :60], state_split)
    assert rel(prefill_got, prefill_want) < AGREE
    # Decode computes the RAM experts through the CPU operator (bf16 products, float32 sums).
    for t in range(60, 72):
        got, want = split(ids[:, t : t + 1], state_split), whole(ids[:, t : t + 1], state_whole)
        assert rel(got, want) < 2e-2
        assert got[0, -1].argmax() == want[0, -1].argmax()


def test_decode_reads_the_ram_experts_in_place(checkpoint, ids):
    """InPlaceDecode (here on the CPU as the GPU side, through kernels/moe's PyTorch forms): the RAM
    experts computed from their tiles where they are, for one token most of them gathered ahead on the
    next layer's guess; the logits stay the whole model's."""
    whole = load_model(checkpoint, dtype=torch.float32, quantize="int4")
    split = load_model(checkpoint, dtype=torch.float32, quantize="int4", placement=plan(GPU_EXPERTS))
    runtime = split.offload
    assert runtime.in_place is None  # the GPU side is the CPU: the CPU computes the RAM experts
    layers = offload.offloaded_layers(split)
    runtime.in_place = offload.InPlaceDecode(layers, torch.device("cpu"))
    state_whole, state_split = whole.new_state(1), split.new_state(1)
    whole(ids[:, :60], state_whole), split(ids[:, :60], state_split)
    runtime.stats.reset()
    for t in range(60, 66):
        got, want = split(ids[:, t : t + 1], state_split), whole(ids[:, t : t + 1], state_whole)
        assert rel(got, want) < AGREE
    counts = runtime.in_place.take_counts()
    assert counts["gathered"] > 0 and counts["found"] > 0 and counts["read_in_place"] > 0
    # A short chunk (a question's few tokens): its pairs read in place, nothing guessed; a layer whose RAM
    # pairs outnumber its RAM experts streams its stack once instead, as a long chunk does.
    runtime.stats.reset()
    got, want = split(ids[:, 66:68], state_split), whole(ids[:, 66:68], state_whole)
    assert rel(got, want) < AGREE
    counts = runtime.in_place.take_counts()
    assert counts["gathered"] == 0 and counts["read_in_place"] > 0
    assert runtime.stats.decode_calls == 0  # no host round trip
    got, want = split(ids[:, 68:72], state_split), whole(ids[:, 68:72], state_whole)
    assert rel(got, want) < AGREE
    assert runtime.stats.streamed_calls > 0
    runtime.in_place.take_counts()
    assert runtime.in_place.take_counts() == {"read_in_place": 0, "gathered": 0, "found": 0}


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_gathered_experts_are_read_from_the_bank_by_their_layer_once(checkpoint, kernels, monkeypatch):
    """The gather, the bank's lookup and the count, through the PyTorch forms and the Triton kernels (under
    the interpreter here: the calls the GPU makes)."""
    split = load_model(checkpoint, dtype=torch.float32, quantize="int4", placement=plan(GPU_EXPERTS))
    layers = offload.offloaded_layers(split)
    assert [layer.stream_bank for layer in layers] == [i % 2 for i in range(len(layers))]
    assert layers[0].next_layer[0] is layers[1] and layers[-1].next_layer is None
    decoder = offload.InPlaceDecode(layers, torch.device("cpu"))
    monkeypatch.setenv("KIMI_DESK_KERNELS", kernels)
    layer = layers[1]  # 4 RAM experts
    decoder.gather(layer, torch.tensor([0, 1, -1]))
    bank = decoder.banks[layer.stream_bank]
    stack = layer.in_ram.tiles["w13"][0]
    assert torch.equal(bank["w13"][0][1], stack[1]) and decoder.held[layer.stream_bank][:3].tolist() == [0, 1, -1]
    x = torch.randn(1, stack.shape[-1] * 2)
    rows, weights = torch.tensor([1, 2, -1]), torch.tensor([0.25, 0.5, 0.25])
    got = decoder.forward(layer, x, rows, weights)
    tiles = layer.in_ram.tiles
    want = streamed_experts_torch(x, tiles["w13"][:2], tiles["w2"][:2], rows, weights)
    assert rel(got, want) < 1e-6
    assert decoder.take_counts() == {"read_in_place": 1, "gathered": 2, "found": 1}
    # Read once: a second read finds nothing gathered.
    decoder.forward(layer, x, rows, weights)
    assert decoder.take_counts() == {"read_in_place": 2, "gathered": 0, "found": 0}
    # A bank gathered for one layer is not read by another on the same bank (a step cut short).
    other = layers[3]
    assert other.stream_bank == layer.stream_bank
    decoder.gather(layer, torch.tensor([0, 1, -1]))
    decoder.take_counts()
    decoder.forward(other, x, torch.tensor([0, 1, -1]), weights)
    assert decoder.take_counts()["found"] == 0


def test_one_quantized_cache_serves_every_placement(checkpoint, ids):
    notices = []
    first = load_model(
        checkpoint, dtype=torch.float32, quantize="int4", placement=plan(GPU_EXPERTS), notice=notices.append
    )
    second = load_model(
        checkpoint, dtype=torch.float32, quantize="int4", placement=plan(OTHER_EXPERTS), notice=notices.append
    )
    whole = load_model(checkpoint, dtype=torch.float32, quantize="int4", notice=notices.append)
    assert notices == []
    want = whole(ids[:, :50], whole.new_state(1))
    for model in (first, second):
        assert rel(model(ids[:, :50], model.new_state(1)), want) < AGREE


def test_a_state_read_under_one_placement_continues_under_another(checkpoint, ids):
    whole = load_model(checkpoint, dtype=torch.float32)
    split = load_model(checkpoint, dtype=torch.float32, placement=plan(OTHER_EXPERTS))
    other = load_model(checkpoint, dtype=torch.float32, placement=plan(GPU_EXPERTS))
    assert split.fingerprint == whole.fingerprint == other.fingerprint  # what snapshots are tied to
    want, _ = run(whole, ids, 64)
    state = split.new_state(1)
    split(ids[:, :64], state)
    got = [other(ids[:, t : t + 1], state) for t in range(64, 68)]
    got += [whole(ids[:, t : t + 1], state) for t in range(68, 72)]
    assert rel(torch.cat(got, 1), want[:, 64:]) < AGREE


def test_the_split_modules_name_their_halves():
    layer = OffloadedExperts(8, 16, 4, gpu_ids=[0, 5], ram_ids=[1, 2, 3, 4, 6, 7])
    assert layer.row_of(5) == ("on_gpu", 1) and layer.row_of(6) == ("in_ram", 4)
    assert offload._runs([1, 2, 3, 6, 7, 9]) == [(1, 0, 3), (6, 3, 2), (9, 5, 1)]


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_both_halves_are_built_on_the_meta_device_with_their_sidecars(quantize):
    # Built elsewhere, a half's quantization sidecars would stay where they were made (materialize only
    # gives meta tensors a device): on a GPU machine the GPU half's scales were left on the CPU.
    from kimi_desk.engine.quantize import quantize_structure
    from kimi_desk.engine.weights import build_on_meta

    model = build_on_meta(tail7_config(moe_intermediate_size=64))
    offload.apply_placement(model, plan(GPU_EXPERTS))
    if quantize:
        quantize_structure(model, quantize)
    halves = [half for layer in offload.offloaded_layers(model) for half in (layer.on_gpu, layer.in_ram)]
    assert halves
    tensors = [t for half in halves for t in (*half.parameters(), *half.buffers())]
    assert len(tensors) > 3 * len(halves) - 1 and all(t.is_meta for t in tensors)


def test_a_dropped_split_model_is_freed_without_the_cycle_collector(checkpoint):
    import gc
    import weakref

    split = load_model(checkpoint, dtype=torch.float32, placement=plan(GPU_EXPERTS))
    layer = weakref.ref(offload.offloaded_layers(split)[0])
    gc.disable()
    try:
        del split
        assert layer() is None
    finally:
        gc.enable()


def test_decode_round_trips_go_through_fixed_host_buffers_and_host_steps(checkpoint, ids):
    """Where engine/cuda_graph.py cuts a recorded decode step: each split layer hands its tokens over and
    joins the CPU's sum as two host steps (one when it has no GPU experts to compute in between), through
    the same host buffers every token; run as steps, the logits are the plain model's."""
    split = load_model(checkpoint, dtype=torch.float32, placement=plan(GPU_EXPERTS))
    whole = load_model(checkpoint, dtype=torch.float32)
    layers = offload.offloaded_layers(split)
    want, _ = run(whole, ids, 60)
    plain, _ = run(split, ids, 60)
    steps = []
    split.offload.cut_recording = lambda step: (steps.append(step), step())
    got, _ = run(split, ids, 60)
    split.offload.cut_recording = None
    per_token = sum(2 if layer.gpu_ids else 1 for layer in layers)
    assert per_token == 9 and len(steps) == per_token * 12
    assert torch.equal(got, plain) and rel(got, want) < AGREE
    addresses = [layer._host.x.data_ptr() for layer in layers]
    run(split, ids[:, :40], 30)
    assert [layer._host.x.data_ptr() for layer in layers] == addresses


def test_a_model_placed_by_its_usage_computes_the_whole_models_logits(checkpoint, ids):
    from kimi_desk.engine.placement import plan_placement
    from kimi_desk.engine.usage import ExpertUsage

    whole = load_model(checkpoint, dtype=torch.float32, quantize="int4")
    usage = ExpertUsage.for_model(whole)
    with usage.counting(whole):
        whole(ids[:, :60], whole.new_state(1))
    usage.counts[2] *= 5  # layer 3's choices weigh more: its share of the GPU grows
    config = whole.config
    full = plan_placement(config, "float32", "int4", gpu_budget=1 << 40)
    budget = full.fixed_bytes + (staging_experts(8) + 13) * full.expert_bytes
    placement = plan_placement(config, "float32", "int4", gpu_budget=budget, usage=usage.per_layer(), usage_tokens=60)
    counts = usage.per_layer()
    assert placement.gpu_count == 13 and len({len(v) for v in placement.gpu_experts.values()}) > 1
    for i in placement.moe_layers:
        ram = [counts[i][e] for e in placement.ram_experts(i)]
        assert all(counts[i][e] >= max(ram, default=0) for e in placement.gpu_experts[i])
    split = load_model(checkpoint, dtype=torch.float32, quantize="int4", placement=placement)
    assert split.offload is not None
    state_whole, state_split = whole.new_state(1), split.new_state(1)
    assert rel(split(ids[:, :60], state_split), whole(ids[:, :60], state_whole)) < AGREE
    for t in range(60, 66):
        got, want = split(ids[:, t : t + 1], state_split), whole(ids[:, t : t + 1], state_whole)
        assert rel(got, want) < 2e-2 and got[0, -1].argmax() == want[0, -1].argmax()
