"""The CPU's recorded decode step: replayed steps equal the model's own steps bit for bit (every weight
format the CPU kernels take, across a cache that fills and grows), a step that reads a value on the host
falls back to the model's modules, and the decode loop uses it."""

from __future__ import annotations

import pytest
import torch

from kimi_desk.bench.random_checkpoint import tiny_config, write_random_checkpoint
from kimi_desk.engine import generate as generate_module
from kimi_desk.engine import load_model
from kimi_desk.engine.cpu_replay import CpuDecoder, cpu_decoder
from kimi_desk.engine.generate import GREEDY, decode_step_function
from kimi_desk.engine.loading import DEMO_MODEL, load_assistant
from kimi_desk.engine.reading_time import state_with_cache
from kimi_desk.engine.state import MLACache
from kimi_desk.kernels import native
from kimi_desk.kernels.quant import avx2 as quant_avx2


def same_steps(model, state, tokens: int, seed: int = 0) -> CpuDecoder:
    """Feed the same random tokens to a replaying decoder and to the model on a copy of the state; every
    step's logits and the states after must be equal."""
    reference = state.clone()
    decoder = CpuDecoder(model, state)
    ids = torch.randint(0, model.config.vocab_size, (tokens,), generator=torch.Generator().manual_seed(seed))
    for token in ids.tolist():
        replayed = decoder.step(token).clone()
        with torch.inference_mode():
            expected = model(torch.tensor([[token]]), reference, last_only=True)[0, -1]
        assert torch.equal(replayed, expected)
    assert state.position == reference.position
    for mine, theirs in zip(state.layers, reference.layers):
        if isinstance(mine, MLACache):
            assert mine.length == theirs.length
            assert torch.equal(mine.latents, theirs.latents)
        else:
            assert torch.equal(mine.recurrent, theirs.recurrent) and torch.equal(mine.conv, theirs.conv)
    return decoder


@pytest.mark.parametrize(
    "quantize, dtype",
    [
        ("none", torch.bfloat16),
        ("int8", torch.bfloat16),
        ("int4", torch.bfloat16),
        ("none", torch.float32),
        ("int4", torch.float32),
    ],
)
def test_the_demo_model_replays_its_steps_exactly(quantize, dtype):
    """The embedded model, whose shapes every CPU kernel takes, in each weight format, computing in
    bfloat16 or in float32 (CPUs without bf16 hardware; its MLA cache stays bfloat16): the step records
    (no value read on the host), replays equal to the model's steps, and records again when a cache
    fills up and grows."""
    model = load_assistant(DEMO_MODEL, "cpu", quantize, dtype=dtype).model
    state = state_with_cache(model, 250, seed=1)
    caches = [layer for layer in state.layers if isinstance(layer, MLACache)]
    assert caches and all(cache.capacity - cache.length < 8 for cache in caches)  # fills within the steps
    decoder = same_steps(model, state, 12)
    assert decoder.not_replayable is None
    assert decoder.recordings == 2
    assert len(decoder.steps) > 0


def test_the_replay_follows_a_state_taken_back():
    """A reply that takes tokens back (the embedded model's copied code spans: state.mark, then restore)
    keeps replaying the same recording, and every step equals the model's on a state taken back alike."""
    model = load_assistant(DEMO_MODEL, "cpu", "int4").model
    state = state_with_cache(model, 100, seed=5)
    reference = state.clone()
    decoder = CpuDecoder(model, state)

    def both(tokens):
        for token in tokens:
            replayed = decoder.step(token).clone()
            with torch.inference_mode():
                expected = model(torch.tensor([[token]]), reference, last_only=True)[0, -1]
            assert torch.equal(replayed, expected)

    both([3, 14, 15])
    mine, theirs = state.mark(), reference.mark()
    both([92, 65, 35])
    state.restore(mine)
    reference.restore(theirs)
    both([89, 79])
    assert decoder.recordings == 1 and decoder.not_replayable is None
    assert state.position == reference.position == 105


def test_a_model_whose_attention_our_kernel_declines_runs_its_modules(tmp_path):
    """A float32 model of other shapes, whose MLA widths the C kernel does not take: PyTorch's attention
    then slices the cache by its length on the host, so the recording stops there, and the steps equal
    the model's."""
    folder = write_random_checkpoint(tiny_config(), tmp_path, seed=3)
    model = load_model(folder, device="cpu", dtype=torch.float32)
    decoder = same_steps(model, state_with_cache(model, 40, seed=2), 4, seed=4)
    assert decoder.not_replayable.startswith("aten.item")


@pytest.mark.parametrize("read", ["item", "tolist"])
def test_a_step_that_reads_a_value_on_the_host_runs_the_model(monkeypatch, read):
    """Something in the step hands a tensor's value to Python (through a dispatched operation, or through
    Tensor.tolist, which none shows): the recording stops, the decoder says why and steps through the
    model's modules, with the same results."""
    model = load_assistant(DEMO_MODEL, "cpu", "none").model
    layer = model.model.layers[0]
    original = type(layer).forward

    def asks_the_host(self, h, pending, layer_state):
        h, out = original(self, h, pending, layer_state)
        float(out.flatten()[0]) if read == "item" else out.flatten()[:2].tolist()
        return h, out

    monkeypatch.setattr(type(layer), "forward", asks_the_host)
    decoder = same_steps(model, state_with_cache(model, 30), 3)
    assert decoder.not_replayable.startswith("aten.item" if read == "item" else "Tensor.tolist")


def test_the_recording_sees_the_kernels_and_the_decode_loop_replays(monkeypatch):
    """native.recording notes every C kernel call; decode_step_function on the CPU replays a recording,
    and its tokens are the model's greedy ones."""
    model = load_assistant(DEMO_MODEL, "cpu", "int4").model
    calls = []
    with native.recording(calls), torch.inference_mode():
        model(torch.tensor([[5]]), model.new_state(1), last_only=True)
    if native.library(quant_avx2.SOURCE) is not None:
        assert len(calls) >= model.config.num_hidden_layers

    made = []

    def kept(model, state):
        made.append(cpu_decoder(model, state))
        return made[-1]

    monkeypatch.setattr(generate_module, "cpu_decoder", kept)
    state = state_with_cache(model, 64)
    reference = state.clone()
    step = decode_step_function(model, state, sampling=GREEDY)
    token, tokens = 7, []
    for _ in range(5):
        token = step(token)
        tokens.append(token)
    assert len(made) == 1 and made[0].recordings == 1 and made[0].not_replayable is None
    token, expected = 7, []
    with torch.inference_mode():
        for _ in range(5):
            token = int(model(torch.tensor([[token]]), reference, last_only=True)[0, -1].argmax())
            expected.append(token)
    assert tokens == expected


def test_no_replay_off_the_cpu_or_for_a_batch():
    model = load_assistant(DEMO_MODEL, "cpu", "none").model
    assert cpu_decoder(model, model.new_state(2)) is None
    with pytest.raises(ValueError, match="batch of 1"):
        CpuDecoder(model, model.new_state(2))
