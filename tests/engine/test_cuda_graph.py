"""The GPU decode path on the CPU: the state kept in place, the fused kernels (through Triton's
interpreter, KIMI_DESK_KERNELS=triton) against the PyTorch path, and the step that engine/cuda_graph.py
records, run eagerly with the cache length on the device, against the plain model, the next token's
choice made inside it against the host's. Recording and
replaying the graph itself needs a GPU: `kimi-desk bench model` checks it there."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
import threading  # noqa: E402

from kimi_desk.engine import load_model  # noqa: E402
from kimi_desk.engine.cuda_graph import GraphDecoder, graph_decoder  # noqa: E402
from kimi_desk.engine.generate import Sampling, generate, stream_tokens  # noqa: E402
from kimi_desk.engine.state import KDAState  # noqa: E402


def rel_err(a, b):
    assert not a.isnan().any() and not b.isnan().any()
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def storage(state):
    return [
        p
        for layer in state.layers
        for p in (
            (layer.recurrent.data_ptr(), layer.conv.data_ptr())
            if isinstance(layer, KDAState)
            else (layer.buffer.data_ptr(),)
        )
    ]


@pytest.fixture(scope="module")
def model(tail7_checkpoint):
    return load_model(tail7_checkpoint, dtype=torch.float32)


def prefilled(model, tokens, seed=0):
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
    state = model.new_state(1)
    logits = model(ids, state, last_only=True)
    return state, logits[:, -1].argmax(-1, keepdim=True)


def test_state_is_updated_in_place(model):
    """Prefill and decode leave every tensor of the state where it was (until a cache outgrows its room)."""
    state = model.new_state(1)
    before = storage(state)
    ids = torch.randint(0, model.config.vocab_size, (1, 100))
    model(ids[:, :90], state)
    for t in range(90, 100):
        model(ids[:, t : t + 1], state)
    assert storage(state) == before and state.position == 100


def test_triton_prefill_matches_the_torch_path(model, monkeypatch):
    """A prefill through the GPU path's kernels (the KDA prepass, then the chunked KDA) gives the PyTorch
    path's logits and states."""
    ids = torch.randint(0, model.config.vocab_size, (1, 150), generator=torch.Generator().manual_seed(3))
    state = model.new_state(1)
    want = model(ids, state)
    triton_state = model.new_state(1)
    monkeypatch.setenv("KIMI_DESK_KERNELS", "triton")
    got = model(ids, triton_state)
    assert rel_err(got, want) < 1e-4
    for got, want in zip(triton_state.layers, state.layers):
        if isinstance(want, KDAState):
            assert rel_err(got.recurrent, want.recurrent) < 1e-4
            assert rel_err(got.conv, want.conv) < 1e-5  # the windows of hidden states a layer on
        else:
            assert rel_err(got.latents, want.latents) < 1e-5


def test_fused_decode_kernels_match_the_torch_path(model, monkeypatch):
    """Decode through the GPU path's kernels (fused short conv and recurrence, MoE GEMV, Triton norms and
    MLA decode) continues a prefill as the PyTorch path does, states included."""
    state, token = prefilled(model, 40)
    fused_state = state.clone()
    for _ in range(4):
        want = model(token, state)
        monkeypatch.setenv("KIMI_DESK_KERNELS", "triton")
        got = model(token, fused_state)
        monkeypatch.delenv("KIMI_DESK_KERNELS")
        assert rel_err(got, want) < 1e-4
        token = want[:, -1].argmax(-1, keepdim=True)
    for got, want in zip(fused_state.layers, state.layers):
        if isinstance(want, KDAState):
            assert rel_err(got.recurrent, want.recurrent) < 1e-4
            assert rel_err(got.conv, want.conv) < 1e-6
        else:
            assert rel_err(got.latents, want.latents) < 1e-5


def test_recorded_step_equals_the_eager_model(model, monkeypatch):
    """The decoder's step (cache length read from the device, host counters advanced after it) gives the
    eager model's logits bit for bit, also across a cache that fills up and grows, and its greedy token
    is their argmax."""
    monkeypatch.setenv("KIMI_DESK_KERNELS", "triton")
    state, token = prefilled(model, 250)  # the caches' first 256 rows: full after 6 steps
    eager_state = state.clone()
    decoder = GraphDecoder(model, state, use_cuda_graph=False)
    for _ in range(9):
        want = model(token, eager_state, last_only=True)[0, -1]
        got = decoder.step(token)
        assert torch.equal(got, want)
        assert decoder.greedy_token.item() == int(want.argmax())
        token = decoder.greedy_token
        assert state.position == eager_state.position
        for layer in state.layers:
            if not isinstance(layer, KDAState):
                assert layer.length == state.position and layer.device_length is None
    assert min(layer.capacity for layer in state.layers if not isinstance(layer, KDAState)) > 256
    for got, want in zip(state.layers, eager_state.layers):
        if isinstance(want, KDAState):
            assert torch.equal(got.recurrent, want.recurrent) and torch.equal(got.conv, want.conv)
        else:
            assert torch.equal(got.latents, want.latents)


def test_eager_steps_between_recorded_ones(model, monkeypatch):
    """The host counters stay the truth: eager steps in between (a prefill of the next turn) are seen by
    the next recorded step, and a replaced state tensor (a restored snapshot) is noticed."""
    monkeypatch.setenv("KIMI_DESK_KERNELS", "triton")
    state, token = prefilled(model, 30, seed=1)
    eager_state = state.clone()
    decoder = GraphDecoder(model, state, use_cuda_graph=False)
    tokens = torch.randint(0, model.config.vocab_size, (1, 3))
    assert torch.equal(decoder.step(token), model(token, eager_state, last_only=True)[0, -1])
    model(tokens, state)
    model(tokens, eager_state)
    state.layers[0].recurrent = state.layers[0].recurrent.clone()
    assert torch.equal(decoder.step(5), model(torch.tensor([[5]]), eager_state, last_only=True)[0, -1])
    assert decoder._prepared_for == decoder._storage(state)
    assert state.position == eager_state.position == 35


def test_one_decoder_per_model_and_state(model):
    first, second = model.new_state(1), model.new_state(1)
    decoder = graph_decoder(model, first)
    assert graph_decoder(model, first) is decoder
    assert graph_decoder(model, second) is not decoder
    with pytest.raises(ValueError):
        GraphDecoder(model, model.new_state(2))


def test_the_step_of_a_model_with_experts_in_ram(tail7_checkpoint, monkeypatch):
    """With routed experts in RAM (engine/offload.py) the recorded step is pieces of graphs with the CPU's
    experts between them; run eagerly as the decoder runs it, the step gives the split model's own logits
    bit for bit and the whole model's within float32 rounding, its state too."""
    from kimi_desk.engine.offload import offloaded_layers
    from kimi_desk.engine.placement import Placement

    whole = load_model(tail7_checkpoint, dtype=torch.float32)
    moe = [i for i in range(whole.config.num_hidden_layers) if whole.config.is_moe_layer(i)]
    E = whole.config.num_experts
    gpu_experts = {i: tuple(range(n % E)) for n, i in enumerate(moe)}  # none, one, two... on the GPU side
    placement = Placement(num_experts=E, gpu_experts=gpu_experts, fixed_bytes=0, expert_bytes=1, staging_bytes=0)
    split = load_model(tail7_checkpoint, dtype=torch.float32, placement=placement)
    assert offloaded_layers(split)
    monkeypatch.setenv("KIMI_DESK_KERNELS", "triton")
    state, token = prefilled(split, 20)
    split_state, whole_state = state.clone(), state.clone()
    decoder = GraphDecoder(split, state, use_cuda_graph=False)
    split_token = whole_token = token
    for _ in range(4):
        got = decoder.step(token).clone()
        want_split = split(split_token, split_state, last_only=True)[0, -1]
        want_whole = whole(whole_token, whole_state, last_only=True)[0, -1]
        assert torch.equal(got, want_split) and rel_err(got, want_whole) < 1e-5
        token = split_token = whole_token = decoder.greedy_token
    for got, want in zip(state.layers, whole_state.layers):
        if isinstance(want, KDAState):
            assert rel_err(got.recurrent, want.recurrent) < 1e-5
        else:
            assert rel_err(got.latents, want.latents) < 1e-5


@pytest.mark.parametrize(
    "sampling",
    [
        Sampling(temperature=1.3, top_p=0.8, seed=5),
        Sampling(temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.3, seed=6),
        Sampling(temperature=0.0, repetition_penalty=1.5),
    ],
    ids=["top-p", "everything", "greedy-penalty"],
)
def test_the_step_chooses_the_next_token_as_the_host_does(model, monkeypatch, sampling):
    """The choice made inside the decoder's step (the draw written by the host, the penalty's marks kept
    on the device) gives generate() the tokens the eager model and the host's sampling give."""
    monkeypatch.setenv("KIMI_DESK_KERNELS", "triton")
    prompt = torch.randint(0, model.config.vocab_size, (20,), generator=torch.Generator().manual_seed(3))

    def tokens():
        state = model.new_state(1)
        return generate(model, prompt, state, max_new_tokens=6, sampling=sampling, stop_token_ids=[]).token_ids

    inside = tokens()
    assert model._graph_decoder is not None and model._graph_decoder.sampling is not None
    monkeypatch.setenv("KIMI_DESK_CUDA_GRAPH", "0")
    assert tokens() == inside


def test_looking_ahead_gives_the_steps_and_the_state_of_step_by_step(model, monkeypatch):
    """The decoder that replays the next step before the host reads its token (and takes it back after a
    stop token or a cancel) yields the Steps of the step-by-step loop and leaves the same state: the KDA
    states and the caches' lengths (sampled with a penalty, so that the draws' order and the marks
    count too)."""
    sampling = Sampling(temperature=1.2, top_p=0.9, repetition_penalty=1.3, seed=int(torch.randint(0, 2**31, ())))
    monkeypatch.setenv("KIMI_DESK_KERNELS", "triton")
    prompt = torch.randint(0, model.config.vocab_size, (4,))

    def run(stop_ids, cancel_after=None):
        state, cancel = model.new_state(1), threading.Event()
        steps = []
        for step in stream_tokens(
            model, prompt, state, max_new_tokens=4, sampling=sampling, stop_token_ids=stop_ids, cancel=cancel
        ):
            steps.append((step.token_id, step.index, step.position, step.finish_reason))
            if len(steps) == cancel_after:
                cancel.set()
        return steps, state

    ahead = run([])
    assert model._graph_decoder.lookahead and [s[3] for s in ahead[0]] == [None] * 3 + ["length"]
    stop = [ahead[0][2][0]]  # the third token the reply chose: the reply stops there
    looked_ahead = [ahead, run(stop), run([], cancel_after=2)]
    monkeypatch.setenv("KIMI_DESK_CUDA_GRAPH", "0")
    step_by_step = [run([]), run(stop), run([], cancel_after=2)]
    for (steps, state), (want_steps, want_state) in zip(looked_ahead, step_by_step):
        assert steps == want_steps and state.position == want_state.position
        for layer, want in zip(state.layers, want_state.layers):
            if isinstance(layer, KDAState):
                assert rel_err(layer.recurrent, want.recurrent) < 1e-5 and torch.equal(layer.conv, want.conv)
            else:
                assert layer.length == want.length
    assert looked_ahead[1][0][-1][3] == "stop" and len(looked_ahead[2][0]) == 2
