"""Generation on random tiny checkpoints: against a from-scratch loop, reproducible sampling, the
state contract (stop, budget, cancellation, next turn), and streamed text."""

from __future__ import annotations

import threading

import pytest
import torch

from kimi_desk.bench.random_checkpoint import tail7_config, tiny_config, write_random_checkpoint
from kimi_desk.engine import generate as generate_module
from kimi_desk.engine import load_model
from kimi_desk.engine.chat import chat_token_ids, next_turn_token_ids, stop_token_ids
from kimi_desk.engine.generate import (
    GREEDY,
    REPEAT_PERIOD,
    REPEAT_TOKENS,
    PrefillCancelled,
    Sampling,
    generate,
    penalize_repetition,
    prefill,
    repeats_itself,
    sample_token,
    stream_tokens,
)
from kimi_desk.engine.tokenizer import StreamDecoder, Tokenizer, kimi_added_tokens, train_ranks
from kimi_desk.kernels.sampling.naive import filter_top_k


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = write_random_checkpoint(tiny_config(), tmp_path_factory.mktemp("tiny"), seed=0)
    return load_model(folder, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def tail7_model(tmp_path_factory):
    folder = write_random_checkpoint(tail7_config(), tmp_path_factory.mktemp("tail7"), seed=1)
    return load_model(folder, device="cpu", dtype=torch.float32)


def prompt_ids(length: int, seed: int = 0, vocab: int = 512) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def next_logits_from_scratch(model, ids: list[int]) -> torch.Tensor:
    """The logits after `ids`, from a fresh state and one full forward."""
    return model(torch.tensor([ids]), model.new_state(1))[0, -1]


# -- against an independent loop ------------------------------------------------------------------------


@pytest.mark.parametrize("which, new_tokens", [("model", 64), ("tail7_model", 64)])
def test_greedy_equals_a_from_scratch_loop(which, new_tokens, request):
    """Greedy tokens from the incremental state equal re-running the whole sequence in a new state at
    every step (the 7-layer model also passes KDA state through an MLA layer)."""
    model = request.getfixturevalue(which)
    prompt = prompt_ids(6, seed=1)
    result = generate(
        model, prompt, model.new_state(1), max_new_tokens=new_tokens, stop_token_ids=[], prefill_chunk_size=4
    )
    sequence = list(prompt)
    for _ in range(new_tokens):
        sequence.append(int(torch.argmax(next_logits_from_scratch(model, sequence))))
    assert result.token_ids == sequence[len(prompt) :]
    assert result.finish_reason == "length"


def test_chunked_prefill_equals_one_forward(model):
    prompt = prompt_ids(50, seed=2)
    whole = next_logits_from_scratch(model, prompt)
    for chunk in (1, 7, 16, 50, 4096):
        state = model.new_state(1)
        logits = prefill(model, prompt, state, chunk_size=chunk)
        assert logits.shape == (1, model.config.vocab_size)
        assert state.position == len(prompt)
        torch.testing.assert_close(logits[0], whole, rtol=1e-4, atol=1e-4)


SAMPLINGS = [
    Sampling(temperature=1.0, seed=3),
    Sampling(temperature=0.7, top_k=20, seed=4),
    Sampling(temperature=1.3, top_p=0.8, seed=5),
    Sampling(temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.3, seed=6),
]


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_seeded_sampling_is_reproducible_across_runs_and_chunk_sizes(model, sampling):
    prompt = prompt_ids(40, seed=7)
    runs = [
        generate(
            model,
            prompt,
            model.new_state(1),
            max_new_tokens=32,
            sampling=sampling,
            stop_token_ids=[],
            prefill_chunk_size=chunk,
        ).token_ids
        for chunk in (40, 40, 1, 9, 16)
    ]
    assert all(run == runs[0] for run in runs)
    other_seed = Sampling(sampling.temperature, sampling.top_k, sampling.top_p, sampling.repetition_penalty, seed=99)
    assert (
        generate(model, prompt, model.new_state(1), max_new_tokens=32, sampling=other_seed, stop_token_ids=[]).token_ids
        != runs[0]
    )


# -- sampling pieces -------------------------------------------------------------------------------------------


def test_filters_and_penalty():
    logits = torch.tensor([1.0, 3.0, 2.0, 3.0, -1.0])
    assert torch.isinf(filter_top_k(logits, 2)).tolist() == [True, False, True, False, True]
    assert torch.isinf(filter_top_k(logits, 1)).tolist() == [True, False, True, True, True]  # the lower id
    assert torch.equal(filter_top_k(logits, 0), logits)
    # Exactly k kept whatever the ties, the lower ids first among equal logits; -0.0 equals 0.0.
    long = torch.randn(3000)
    long[torch.randint(0, len(long), (40,))] = long.max()
    long[:50:2], long[1:50:2] = 0.0, -0.0
    for k in (1, 7, 41, 50, 90):
        order = sorted(range(len(long)), key=lambda i: (-float(long[i]), i))[:k]
        want = torch.full_like(long, -float("inf"))
        want[order] = long[order]
        assert torch.equal(filter_top_k(long, k), want)
    seen = torch.tensor([True, False, False, True, True])
    assert penalize_repetition(logits, seen, 2.0).tolist() == [0.5, 3.0, 2.0, 1.5, -2.0]
    assert sample_token(logits, GREEDY) == 1  # the first of the tied maxima
    assert sample_token(logits, GREEDY, seen=seen) == 1
    assert sample_token(logits, Sampling(0.0, repetition_penalty=2.0), seen=seen) == 1


def test_choosing_a_token_takes_no_host_value():
    """A CUDA graph records choose_token; a host scalar copied into a device tensor (item assignment
    such as `t[0] = False` does that on a GPU) cannot be recorded. The ops that bring a host value in
    are scalar_tensor, lift_fresh and copy_: none may run."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from kimi_desk.engine.generate import choose_token
    from kimi_desk.kernels.sampling.naive import choose_sampled_torch

    ops = []

    class RecordOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.__name__)
            return func(*args, **(kwargs or {}))

    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    logits = torch.randn(1000, generator=generator)
    seen = torch.rand(1000, generator=generator) < 0.1
    uniform = torch.rand(1, generator=generator, dtype=torch.float64)
    for sampling in (Sampling(0.8, top_k=40, top_p=0.9, repetition_penalty=1.2), Sampling(0.7, top_p=0.5), GREEDY):
        with RecordOps():
            choose_token(logits, sampling, uniform, seen)
    assert ops and not {"scalar_tensor.default", "lift_fresh.default", "copy_.default"} & set(ops)
    # The top-p choice a GPU records under KIMI_DESK_KERNELS=torch (the CPU takes its own C call): it
    # reads no host value back either.
    weights = torch.exp(logits - logits.max())
    ops.clear()
    with RecordOps():
        choose_sampled_torch(weights, 0.5, uniform)
    host = {"scalar_tensor.default", "lift_fresh.default", "copy_.default", "_local_scalar_dense.default"}
    assert ops and not host & set(ops)


def test_sampling_follows_the_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0, -30.0])
    generator = Sampling(seed=0).new_generator()
    draws = torch.tensor([sample_token(logits, Sampling(temperature=1.0), generator) for _ in range(4000)])
    frequencies = torch.bincount(draws, minlength=4).double() / len(draws)
    torch.testing.assert_close(frequencies, torch.softmax(logits.double(), -1), atol=0.03, rtol=0)
    restricted = [sample_token(logits, Sampling(top_k=2), generator) for _ in range(200)]
    assert set(restricted) == {1, 2}


def test_sampling_parameters_are_checked():
    from kimi_desk.engine.errors import UserError

    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1), dict(repetition_penalty=0)):
        with pytest.raises(UserError):
            Sampling(**bad)


# -- the state contract -------------------------------------------------------------------------------------------


def test_stop_token_ends_the_turn_unfed(model):
    prompt = prompt_ids(10, seed=8)
    free = generate(model, prompt, model.new_state(1), max_new_tokens=20, stop_token_ids=[]).token_ids
    stop = free[7]
    first = free.index(stop)
    state = model.new_state(1)
    steps = list(stream_tokens(model, prompt, state, max_new_tokens=20, stop_token_ids=[stop]))
    assert [s.token_id for s in steps] == free[: first + 1]
    assert steps[-1].finish_reason == "stop" and all(s.finish_reason is None for s in steps[:-1])
    # The stop token was not fed: the state holds the prompt and the tokens before it.
    assert state.position == len(prompt) + first == steps[-1].position
    continued = model(torch.tensor([[stop]]), state)[0, -1]
    reference = next_logits_from_scratch(model, prompt + free[: first + 1])
    torch.testing.assert_close(continued, reference, rtol=1e-4, atol=1e-4)


class HoldTokens:
    """A span rewriter on positions: the reply's tokens `begin` to `end` - 1 form a span; it is replaced
    by `ids` (None: kept)."""

    def __init__(self, begin: int, end: int, ids: list[int] | None):
        self.begin, self.end, self.ids, self.asked = begin, end, ids, []

    def is_open(self, reply_ids):
        return self.begin < len(reply_ids) <= self.end and not self.asked

    def rewrite(self, reply_ids, opened_at, likelihoods):
        self.asked.append((list(reply_ids), opened_at))
        return self.ids


@pytest.mark.parametrize("stop_inside", [False, True])
def test_a_rewritten_span_leaves_the_state_as_if_the_model_had_written_it(model, stop_inside):
    """The held span's tokens are replaced: the state goes back and takes the new ids, the reply goes on
    from there greedily, and the state at the end equals one that read the prompt and the final reply;
    the steps are the final reply, in order. A stop token inside the span settles it and the reply
    goes on after the new ids."""
    prompt = prompt_ids(10, seed=11)
    free = generate(model, prompt, model.new_state(1), max_new_tokens=16, stop_token_ids=[]).token_ids
    new_ids = [free[0] ^ 1, 5, 9, 300, 42]
    rewriter = HoldTokens(2, 5, new_ids)
    stops = [free[3]] if stop_inside and free[3] not in free[:3] else []
    state = model.new_state(1)
    steps = list(stream_tokens(model, prompt, state, max_new_tokens=16, stop_token_ids=stops, span_rewriter=rewriter))
    reply = [s.token_id for s in steps if s.finish_reason != "stop"]
    ((asked, opened_at),) = rewriter.asked
    assert opened_at == 2 and asked[:2] == free[:2]
    assert reply[: 2 + len(new_ids)] == free[:2] + new_ids
    assert [s.index for s in steps] == list(range(len(steps)))
    # Greedy after the new ids, from a state that read them.
    sequence = prompt + reply[: 2 + len(new_ids)]
    for token in reply[2 + len(new_ids) :]:
        assert token == int(torch.argmax(next_logits_from_scratch(model, sequence)))
        sequence.append(token)
    # Every reply token fed (a stop token is not), the discarded span's none.
    assert state.position == len(prompt) + len(reply) == steps[-1].position
    after = model(torch.tensor([[7]]), state)[0, -1]
    torch.testing.assert_close(after, next_logits_from_scratch(model, prompt + reply + [7]), rtol=1e-4, atol=1e-4)


class WeighCandidates:
    """A span rewriter on positions that offers several candidates for the span at `begin`..`end` - 1
    and takes the one the decode loop's likelihoods rate highest; keeps what it was told."""

    def __init__(self, begin: int, end: int, candidates: list[list[int]]):
        self.begin, self.end, self.candidates, self.scores = begin, end, candidates, None

    def is_open(self, reply_ids):
        return self.begin < len(reply_ids) <= self.end and self.scores is None

    def rewrite(self, reply_ids, opened_at, likelihoods):
        self.scores = likelihoods(self.candidates)
        return self.candidates[max(range(len(self.candidates)), key=self.scores.__getitem__)]


def test_candidates_for_a_span_are_weighed_by_the_model_from_the_state_before_it(model):
    """Each candidate's score is its log-probability from its second token on, after the prompt and
    the reply before the span, as a fresh state reading the whole sequence in float64 gives it; the
    reply takes the best one and goes on greedily from a state that read it."""
    prompt = prompt_ids(10, seed=13)
    free = generate(model, prompt, model.new_state(1), max_new_tokens=12, stop_token_ids=[]).token_ids
    generator = torch.Generator().manual_seed(14)
    candidates = [[free[2]] + torch.randint(0, 512, (n,), generator=generator).tolist() for n in (3, 1, 4, 2)]
    rewriter = WeighCandidates(2, 5, candidates)
    steps = list(
        stream_tokens(model, prompt, model.new_state(1), max_new_tokens=12, stop_token_ids=[], span_rewriter=rewriter)
    )
    before = prompt + free[:2]
    exact = model.to(torch.float64)
    try:
        for ids, score in zip(candidates, rewriter.scores):
            logits = exact(torch.tensor([before + ids[:-1]]), exact.new_state(1))[0, len(before) :]
            expected = sum(torch.log_softmax(logits[i], -1)[token].item() for i, token in enumerate(ids[1:]))
            assert score == pytest.approx(expected, abs=1e-4)
    finally:
        model.to(torch.float32)
    best = candidates[max(range(len(candidates)), key=rewriter.scores.__getitem__)]
    reply = [s.token_id for s in steps]
    assert reply[: 2 + len(best)] == free[:2] + best
    sequence = prompt + reply[: 2 + len(best)]
    for token in reply[2 + len(best) :]:
        assert token == int(torch.argmax(next_logits_from_scratch(model, sequence)))
        sequence.append(token)


def test_a_span_kept_as_written_streams_as_without_a_rewriter(model):
    prompt = prompt_ids(10, seed=12)
    plain = generate(model, prompt, model.new_state(1), max_new_tokens=12, stop_token_ids=[])
    rewriter = HoldTokens(3, 7, None)
    held = generate(model, prompt, model.new_state(1), max_new_tokens=12, stop_token_ids=[], span_rewriter=rewriter)
    assert held.token_ids == plain.token_ids and [s.position for s in held.steps] == [s.position for s in plain.steps]
    assert rewriter.asked and held.finish_reason == "length"


def test_budget_end_feeds_every_token(model):
    prompt = prompt_ids(10, seed=9)
    state = model.new_state(1)
    result = generate(model, prompt, state, max_new_tokens=5, stop_token_ids=[])
    assert result.finish_reason == "length" and len(result.token_ids) == 5
    assert state.position == len(prompt) + 5
    assert [s.index for s in result.steps] == list(range(5))
    assert all(s.seconds > 0 for s in result.steps)
    assert generate(model, prompt, model.new_state(1), max_new_tokens=0).finish_reason == "length"


def test_repeats_itself_only_on_one_short_piece_over_and_over():
    """Fresh random pieces of distinct tokens: repeated over REPEAT_TOKENS tokens after any start, the
    reply repeats itself; one token changed, one token short, or a piece longer than REPEAT_PERIOD, not."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    for _ in range(100):
        period = int(torch.randint(1, REPEAT_PERIOD + 2, (), generator=gen))
        tokens = torch.randperm(10**5, generator=gen)[: period + 40].tolist()
        piece, head = tokens[:period], tokens[period : period + int(torch.randint(0, 40, (), generator=gen))]
        tail = (piece * (REPEAT_TOKENS // period + 2))[: REPEAT_TOKENS + int(torch.randint(0, 8, (), generator=gen))]
        assert repeats_itself(head + tail) == (period <= REPEAT_PERIOD)
        assert not repeats_itself(tail[-REPEAT_TOKENS + 1 :])
        changed = list(tail)
        changed[len(changed) - 1 - int(torch.randint(0, REPEAT_TOKENS, (), generator=gen))] = -1
        assert not repeats_itself(head + changed)


@pytest.mark.parametrize("looking_ahead", [False, True])
def test_a_reply_that_repeats_itself_ends_there_fed(tmp_path, monkeypatch, looking_ahead):
    """A model whose every logit is 0 writes token 0 over and over (greedy takes the first of equal
    logits): the reply ends with "repetition" once it repeats itself, every token of it fed, on the
    step-by-step loop and on the decoder that looks ahead."""
    folder = write_random_checkpoint(tiny_config(), tmp_path, seed=3)
    looping = load_model(folder, dtype=torch.float32)
    with torch.no_grad():
        looping.lm_head.weight.zero_()
    monkeypatch.setattr(generate_module, "REPEAT_TOKENS", 12)
    monkeypatch.setenv("KIMI_DESK_KERNELS", "triton" if looking_ahead else "torch")
    prompt, state = prompt_ids(8, seed=4), looping.new_state(1)
    result = generate(looping, prompt, state, max_new_tokens=40, stop_token_ids=[])
    assert (getattr(looping, "_graph_decoder", None) is not None) == looking_ahead
    assert result.finish_reason == "repetition" and result.token_ids == [0] * 12
    assert state.position == len(prompt) + 12 and result.steps[-1].finish_reason == "repetition"


def test_context_limit_ends_generation(tmp_path):
    folder = write_random_checkpoint(tiny_config(model_max_length=24), tmp_path, seed=2)
    small = load_model(folder, dtype=torch.float32)
    state = small.new_state(1)
    result = generate(small, prompt_ids(20, seed=10), state, max_new_tokens=50, stop_token_ids=[])
    assert result.finish_reason == "length" and len(result.token_ids) == 4 and state.position == 24
    with pytest.raises(ValueError, match="exceeds model_max_length"):
        generate(small, prompt_ids(25), small.new_state(1), max_new_tokens=1)


def test_cancel_returns_within_one_step_and_the_next_turn_continues(model):
    """Cancel after 5 tokens, then run a next turn; it equals an uninterrupted run of the same ids."""
    prompt = prompt_ids(12, seed=11)
    sampling = Sampling(temperature=0.8, top_k=40, seed=12)
    cancel = threading.Event()
    state = model.new_state(1)
    emitted = []
    for step in stream_tokens(
        model, prompt, state, max_new_tokens=100, sampling=sampling, stop_token_ids=[], cancel=cancel
    ):
        emitted.append(step.token_id)
        if len(emitted) == 5:
            cancel.set()
    assert len(emitted) == 5
    assert state.position == len(prompt) + 5

    next_turn = prompt_ids(7, seed=13)
    continued = generate(model, next_turn, state, max_new_tokens=20, stop_token_ids=[]).token_ids
    reference_state = model.new_state(1)
    reference = generate(
        model, prompt + emitted + next_turn, reference_state, max_new_tokens=20, stop_token_ids=[]
    ).token_ids
    assert continued == reference
    assert state.position == reference_state.position


def test_cancel_from_another_thread(model):
    """A worker thread generates; the caller cancels while it runs; the worker stops within a step."""
    cancel = threading.Event()
    started, steps, steps_after_cancel = threading.Event(), [], []
    state = model.new_state(1)

    def worker():
        for step in stream_tokens(
            model,
            prompt_ids(8),
            state,
            max_new_tokens=3000,
            stop_token_ids=[],
            cancel=cancel,
            sampling=Sampling(seed=0),
        ):
            (steps_after_cancel if cancel.is_set() else steps).append(step)
            started.set()

    thread = threading.Thread(target=worker)
    thread.start()
    assert started.wait(30)
    cancel.set()
    thread.join(30)
    assert not thread.is_alive()
    assert len(steps_after_cancel) <= 1
    assert all(step.finish_reason is None for step in steps + steps_after_cancel)
    assert state.position == 8 + len(steps) + len(steps_after_cancel)


def test_cancel_during_prefill_leaves_a_prefix(model):
    prompt = prompt_ids(40, seed=14)
    calls = []
    state = model.new_state(1)
    result = generate(
        model, prompt, state, max_new_tokens=5, prefill_chunk_size=16, cancel=lambda: calls.append(1) or len(calls) > 1
    )
    assert result.finish_reason == "cancelled" and result.token_ids == []
    assert state.position == 32
    with pytest.raises(PrefillCancelled) as info:
        prefill(model, prompt, model.new_state(1), chunk_size=10, cancel=lambda: True)
    assert info.value.consumed == 10


# -- chat turns and text ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_setup(tmp_path_factory):
    """A tokenizer whose tokens split UTF-8 characters (a small byte-level vocabulary trained on
    multilingual text), with Kimi's special tokens, and a random model with exactly its vocabulary."""
    texts = ["naïve café 中文字符测试 日本語のテキスト 🙂👍🏽 ελληνικά русский текст hello world\n"] * 30
    ranks = train_ranks(texts, vocab_size=330)
    tokenizer = Tokenizer.from_ranks(ranks, kimi_added_tokens(len(ranks)))
    config = tiny_config(vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.special_tokens["<|im_end|>"])
    folder = write_random_checkpoint(config, tmp_path_factory.mktemp("chat"), seed=3)
    return tokenizer, load_model(folder, dtype=torch.float32)


def test_streamed_text_equals_the_decoded_sequence(chat_setup):
    tokenizer, model = chat_setup
    assert any(b >= 0x80 for t in range(256, tokenizer.vocab_size - 258) for b in tokenizer.id_to_bytes(t)[-1:])
    prompt = chat_token_ids(tokenizer, [{"role": "user", "content": "Say something in 中文 🙂"}])
    # Sampled ids from a random model: plenty of characters split across tokens, and broken UTF-8.
    for seed in range(2):
        decoder, streamed, ids = StreamDecoder(tokenizer), [], []
        for step in stream_tokens(
            model,
            prompt,
            model.new_state(1),
            max_new_tokens=80,
            sampling=Sampling(temperature=1.0, seed=seed),
            stop_token_ids=[],
        ):
            ids.append(step.token_id)
            streamed.append(decoder.push(step.token_id))
        assert "".join(streamed) + decoder.flush() == tokenizer.decode(ids)
    text = "中文 🙂 naïve"
    decoder = StreamDecoder(tokenizer)
    deltas = [decoder.push(i) for i in tokenizer.encode(text)]
    assert "".join(deltas) == text and "\ufffd" not in "".join(deltas)


def test_two_turns_equal_one_from_scratch_run(chat_setup):
    """Turn 1 ends at a stop token (not fed); turn 2 starts with <|im_end|>. The second answer equals
    generating from the whole conversation's ids in a fresh state."""
    tokenizer, model = chat_setup
    stops = stop_token_ids(tokenizer, model.config)
    first_prompt = chat_token_ids(tokenizer, [{"role": "user", "content": "hello"}])
    free = generate(model, first_prompt, model.new_state(1), max_new_tokens=12, stop_token_ids=[]).token_ids
    # Make turn 1 stop on its 6th token by declaring that token a stop id.
    stops_here = stops | {free[5]}
    state = model.new_state(1)
    first = generate(model, first_prompt, state, max_new_tokens=12, stop_token_ids=stops_here)
    assert first.finish_reason == "stop"
    answer = first.token_ids[:-1]
    second_prompt = next_turn_token_ids(tokenizer, [{"role": "user", "content": "and again"}])
    second = generate(model, second_prompt, state, max_new_tokens=16, stop_token_ids=[])
    whole = first_prompt + answer + second_prompt
    assert whole[len(first_prompt) + len(answer)] == tokenizer.special_tokens["<|im_end|>"]
    reference = generate(model, whole, model.new_state(1), max_new_tokens=16, stop_token_ids=[])
    assert second.token_ids == reference.token_ids
