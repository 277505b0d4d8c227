"""Generation: chunked prefill, sampling and the decode loop. Token ids in, token ids out; no text.

    logits = prefill(model, prompt_ids, state)                       # [B, vocab] after the last prompt token
    for step in stream_tokens(model, prompt_ids, state, max_new_tokens=256, sampling=Sampling(0.7, top_p=0.9, seed=1),
                              stop_token_ids=stops, cancel=event):
        ...  # step.token_id, step.seconds, step.finish_reason

State contract. Each sampled token is fed to the model before it is yielded, except a stop token,
which is never fed. So at every yield, and after the stream ends for any reason (stop, budget, context
limit, cancellation, or the caller dropping the generator), the state has consumed the prompt and
every yielded token except a stop token; `state.position` counts them. The assistant turn is left
open: the next turn starts with `<|im_end|>` (chat.next_turn_token_ids). Feeding before yielding
costs the caller one decode step of latency per token and buys a state that is consistent whenever
the caller sees it.

Cancellation (a threading.Event or a callable returning True) is checked between prefill chunks and
before every step, so the stream ends within one step of it. Cancelled during prefill, the state holds
a prefix of the prompt (`state.position` says how much).

On a GPU each decode step replays a recorded CUDA graph (engine/cuda_graph.py; pieces of graphs with the
CPU's experts between them when some experts live in RAM), the choice of the next token included, so
the host's part of a step is a replay and reading one id back; KIMI_DESK_CUDA_GRAPH=0 runs it eagerly
instead. Both compute the same logits and choose alike. Where the step is one graph (no experts in RAM)
and no span rewriter holds the reply, the decoder looks ahead: the next step is replayed before the host
reads the token it feeds, and taken back when that token is not fed (`_stream_looking_ahead`).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from kimi_desk import environment
from kimi_desk.engine.cpu_replay import cpu_decoder
from kimi_desk.engine.errors import UserError
from kimi_desk.engine.state import ModelState
from kimi_desk.kernels import use_triton
from kimi_desk.kernels.sampling import choose_greedy, choose_top_k
from kimi_desk.kernels.sampling.naive import penalize_repetition

if TYPE_CHECKING:
    from kimi_desk.engine.model import KimiLinearForCausalLM

# Tokens per prefill call: large enough to keep the kernels busy, small enough that the activations of
# one chunk stay modest and that cancellation is noticed often during a long document.
DEFAULT_PREFILL_CHUNK = 4096

Cancel = threading.Event | Callable[[], bool] | None


class PrefillCancelled(Exception):
    """Prefill stopped between chunks; `consumed` prompt tokens are in the state."""

    def __init__(self, consumed: int):
        super().__init__(f"prefill cancelled after {consumed} tokens")
        self.consumed = consumed


def is_cancelled(cancel: Cancel) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


# -- prefill ---------------------------------------------------------------------------------------


def _as_batch(ids: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A list of ids, a [T] or a [B, T] tensor -> [B, T] int64 on the model's device."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"expected a non-empty [T] or [B, T] sequence of token ids, got shape {tuple(ids.shape)}")
    return ids.to(device)


def prefill(
    model: KimiLinearForCausalLM,
    ids: Sequence[int] | torch.Tensor,
    state: ModelState,
    chunk_size: int = DEFAULT_PREFILL_CHUNK,
    cancel: Cancel = None,
) -> torch.Tensor:
    """Feed `ids` to the model `chunk_size` tokens at a time; the logits after the last one, [B, vocab].

    Only the last position's logits are computed per chunk (an lm_head over every token of a long
    document would cost vocab x T memory for nothing). Raises PrefillCancelled between chunks.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    batch = _as_batch(ids, model.device)  # [B, T]
    logits = None
    for start in range(0, batch.shape[1], chunk_size):
        if start > 0 and is_cancelled(cancel):
            raise PrefillCancelled(start)
        logits = model(batch[:, start : start + chunk_size], state, last_only=True)  # [B, 1, V]
    return logits[:, -1]


# -- sampling --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0 is greedy; top_k 0, top_p 1 and repetition_penalty 1
    are off. Order, as in Hugging Face's generate: repetition penalty, temperature, top-k, top-p; top-k
    keeps exactly k tokens (among equal logits the lower id).
    With a seed the choice is reproducible (one uniform draw per sampled token, none when greedy)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise UserError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def new_generator(self) -> torch.Generator:
        generator = torch.Generator(device="cpu")
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator


GREEDY = Sampling(temperature=0.0)


def choose_token(
    logits: torch.Tensor, sampling: Sampling, uniform: torch.Tensor | None = None, seen: torch.Tensor | None = None
) -> torch.Tensor:
    """The next token from one position's logits [V] as a [1] int64 tensor on their device, with no host
    synchronisation (a recorded decode step computes it: engine/cuda_graph.py). `seen` [V] bool marks
    the tokens the repetition penalty applies to; `uniform` [1] float64 on the same device is the draw
    of a sampled token (unused when greedy). A sampled token is drawn from the weights exp(score - max)
    of the top-k, top-p applied, by kimi_desk.kernels.sampling: the choice follows from the draw whatever the device
    and the vocabulary size, and a token of weight 0 is never picked."""
    logits = logits.float()
    if sampling.greedy:
        if seen is not None and sampling.repetition_penalty != 1:
            logits = penalize_repetition(logits, seen, sampling.repetition_penalty)
        return choose_greedy(logits)
    return choose_top_k(
        logits, sampling.top_k, sampling.top_p, uniform, sampling.temperature, seen, sampling.repetition_penalty
    )


def draw_uniform(sampling: Sampling, generator: torch.Generator | None) -> float | None:
    """The one uniform draw a sampled token takes from the generator (None when greedy)."""
    return None if sampling.greedy else torch.rand((), generator=generator, dtype=torch.float64).item()


def sample_token(
    logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None, seen: torch.Tensor | None = None
) -> int:
    """The next token from one position's logits [V], on the host's word: choose_token with one draw from
    `generator`."""
    u = draw_uniform(sampling, generator)
    uniform = None if u is None else torch.tensor([u], dtype=torch.float64, device=logits.device)
    return int(choose_token(logits, sampling, uniform, seen))


# -- the decode loop -----------------------------------------------------------------------------------


def decode_step_function(
    model: KimiLinearForCausalLM,
    state: ModelState,
    vocab_size: int | None = None,
    sampling: Sampling = GREEDY,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
    eager: bool = False,
) -> Callable[[int], int]:
    """token id -> the next token id: the token fed (advancing `state` by one) and the next one chosen
    from the logits after it, the fed token marked for the repetition penalty (in `seen` on the eager
    path; in the decoder's own copy of it on the GPU). On the GPU a replayed CUDA graph does both,
    sampling included, so the host only reads the chosen id back, except when asked for the eager model
    (`eager`: a loop that rolls the state back, which the graph's own buffers would not follow); on the
    CPU a replayed recording of the step (engine/cpu_replay.py), which follows such a loop, and
    sample_token. All take one draw from `generator` per sampled token and choose alike."""
    decoder = None if eager else recorded_decoder(model, state, vocab_size, sampling, seen)
    if decoder is not None:

        def replayed(token: int) -> int:
            decoder.step(token, draw_uniform(sampling, generator))
            return int(decoder.next_token)

        return replayed

    # The CPU's replay follows a state rolled back (`eager`): restore() keeps the tensors' storage, and the
    # replay reads the caches' lengths from the state at every step.
    replayer = cpu_decoder(model, state)
    if replayer is not None:

        def replayed_on_cpu(token: int) -> int:
            logits = replayer.step(token)[:vocab_size]
            if seen is not None:
                seen[token] = True
            return sample_token(logits, sampling, generator, seen)

        replayed_on_cpu.decoder = replayer  # what `kimi-desk bench cpu` reports: replayed, or why not
        return replayed_on_cpu

    def step_eagerly(token: int) -> int:
        logits = model(torch.tensor([[token]], device=model.device), state, last_only=True)[0, -1, :vocab_size]
        if seen is not None:
            seen[token] = True
        return sample_token(logits, sampling, generator, seen)

    return step_eagerly


def recorded_decoder(
    model: KimiLinearForCausalLM,
    state: ModelState,
    vocab_size: int | None,
    sampling: Sampling,
    seen: torch.Tensor | None,
    lookahead: bool = False,
):
    """The model's recorded decoder (engine/cuda_graph.py) for `state`, choosing by `sampling`, looking
    ahead or not; None where decode runs eagerly. Recording needs the Triton path: the PyTorch MoE asks
    the host which experts were chosen. Experts computed in RAM (engine/offload.py) may cut the
    recording into pieces with the CPU's work between."""
    if not (use_triton(model.lm_head.weight) and environment.cuda_graph()):
        return None
    from kimi_desk.engine.cuda_graph import graph_decoder

    decoder = graph_decoder(model, state, vocab_size)
    decoder.use_sampling(sampling, seen)
    decoder.use_lookahead(lookahead)
    return decoder


@dataclass(frozen=True)
class Step:
    """One generated token.

    `seconds` is the engine's time for this token: feeding it to the model and choosing the one after it
    (for the first token also the prefill and its own choice, so it is the time to first token); time the
    caller spends between steps is not counted. `position` is state.position after the step. `finish_reason` is set on the
    last step: "stop" (a stop token, not fed), "length" (the token budget or the context is used up) or
    "repetition" (the reply came round to one short piece over and over: `repeats_itself`).
    """

    token_id: int
    index: int
    seconds: float
    position: int
    finish_reason: str | None = None


class SpanRewriter(Protocol):
    """Rewrites a reply's spans once they close (engine/code_spans.py: code spans held to the document)."""

    def is_open(self, reply_ids: Sequence[int]) -> bool: ...

    def rewrite(
        self, reply_ids: Sequence[int], opened_at: int, likelihoods: Callable[[list[list[int]]], list[float]]
    ) -> list[int] | None: ...


def span_likelihoods(
    model: KimiLinearForCausalLM, state: ModelState, mark, vocab_size: int | None
) -> Callable[[list[list[int]]], list[float]]:
    """ids of candidates for a held span -> each one's log-probability under the model, read from the
    state at `mark` (before the span), from its second token on: the first, which opens the span, is
    the same in every candidate (the text before the span's backtick is). The state is left at `mark`."""

    @torch.no_grad()
    def likelihoods(candidates: list[list[int]]) -> list[float]:
        scores = []
        for ids in candidates:
            state.restore(mark)
            if len(ids) < 2:
                scores.append(0.0)
                continue
            logits = model(torch.tensor([ids[:-1]], device=model.device), state)[0, :, :vocab_size]
            following = torch.tensor(ids[1:], device=logits.device)
            chosen = torch.log_softmax(logits.float(), dim=-1).gather(1, following[:, None])
            scores.append(float(chosen.sum()))
        state.restore(mark)
        return scores

    return likelihoods


# A span held back longer than this is settled as it is, open or not, so the reply keeps streaming.
MAX_HELD_TOKENS = 48

# A reply whose last REPEAT_TOKENS tokens are one piece of at most REPEAT_PERIOD tokens said over and
# over ("Greta Greta Greta ...") ends there: a small model's greedy reply can loop until its token limit,
# and nothing a reader wants is 64 tokens of one short piece.
REPEAT_PERIOD = 16
REPEAT_TOKENS = 64


def repeats_itself(reply: Sequence[int]) -> bool:
    """Whether the reply ends in REPEAT_TOKENS tokens of one piece of at most REPEAT_PERIOD tokens, repeated."""
    if len(reply) < REPEAT_TOKENS:
        return False
    tail = list(reply[-REPEAT_TOKENS:])
    return any(tail[period:] == tail[:-period] for period in range(1, REPEAT_PERIOD + 1))


def stream_tokens(
    model: KimiLinearForCausalLM,
    prompt_ids: Sequence[int] | torch.Tensor,
    state: ModelState,
    *,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    stop_token_ids: Collection[int] | None = None,
    cancel: Cancel = None,
    prefill_chunk_size: int = DEFAULT_PREFILL_CHUNK,
    vocab_size: int | None = None,
    span_rewriter: SpanRewriter | None = None,
) -> Iterator[Step]:
    """Prefill `prompt_ids` (batch 1) into `state`, then yield generated tokens one Step at a time.

    Stops after a stop token (default: the config's eos ids), after max_new_tokens, when the state
    reaches model_max_length, when the reply repeats itself (`repeats_itself`), or when cancelled (then
    without a final Step; likewise when the prompt leaves no room or max_new_tokens is 0). See the module docstring for what the state holds.
    With `vocab_size` (the tokenizer's), ids at or above it are never sampled: an embedding padded past
    the tokenizer has rows no text maps to. With `span_rewriter`, the tokens of a span (from the token
    that opens it to the one that closes it) are held back until it closes; when the rewriter gives
    other ids for it (weighing candidates by the model's probability of them, `span_likelihoods`), the
    state goes back to before the span, takes those ids instead, and the reply goes on from them; then
    the span's tokens are yielded.
    """
    if state.batch_size != 1:
        raise ValueError(f"generation runs on a batch of 1, the state has {state.batch_size}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    prompt = _as_batch(prompt_ids, model.device)  # [1, T]
    max_length = model.config.model_max_length
    if state.position + prompt.shape[1] > max_length:
        raise ValueError(
            f"the prompt ({prompt.shape[1]} tokens after {state.position}) exceeds model_max_length={max_length}"
        )
    stops = frozenset(model.config.stop_token_ids if stop_token_ids is None else stop_token_ids)

    started = time.perf_counter()
    try:
        logits = prefill(model, prompt, state, prefill_chunk_size, cancel)[0, :vocab_size]  # [V]
    except PrefillCancelled:
        return
    generator = None if sampling.greedy else sampling.new_generator()
    seen = None
    if sampling.repetition_penalty != 1:
        seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        seen[prompt[0]] = True
    token = sample_token(logits, sampling, generator, seen)
    # Looking ahead needs the step to be one graph (no experts in RAM) and the reply not held back.
    looks_ahead = span_rewriter is None and not getattr(model, "offload", None)
    decoder = recorded_decoder(model, state, vocab_size, sampling, seen, lookahead=True) if looks_ahead else None
    if decoder is not None:
        if max_new_tokens:
            yield from _stream_looking_ahead(
                decoder, token, state, sampling, generator, stops, max_new_tokens, cancel, started
            )
        return
    advance = decode_step_function(model, state, vocab_size, sampling, generator, seen, eager=span_rewriter is not None)
    reply: list[int] = []
    yielded = 0  # reply tokens already yielded; the rest are a span held back
    opened_at, mark = None, None  # where the held span begins in the reply, and the state before it
    first_position = state.position  # after the prompt: reply token i is fed at first_position + i

    while max_new_tokens:
        if is_cancelled(cancel) or state.position >= max_length:
            # A span held back when cancelled is yielded as written: the state holds it.
            for index in range(yielded, len(reply)):
                yield Step(reply[index], index, 0.0, first_position + index + 1)
            return
        following, finish = None, None
        if token in stops:
            finish = "stop"
        else:
            if span_rewriter is not None and opened_at is None and span_rewriter.is_open(reply + [token]):
                opened_at, mark = len(reply), state.mark()
            reply.append(token)
            following = advance(token)  # fed, and the next token chosen
            if len(reply) >= max_new_tokens or state.position >= max_length:
                finish = "length"
            elif repeats_itself(reply):
                finish = "repetition"
        if opened_at is not None and (
            finish is not None or not span_rewriter.is_open(reply) or len(reply) - opened_at >= MAX_HELD_TOKENS
        ):
            ids = span_rewriter.rewrite(reply, opened_at, span_likelihoods(model, state, mark, vocab_size))
            if ids is not None:
                ids = ids[: min(max_new_tokens, max_length - first_position) - opened_at]
            if ids:
                state.restore(mark)
                del reply[opened_at:]
                for fed in ids:
                    reply.append(fed)
                    following = advance(fed)
                at_limit = len(reply) >= max_new_tokens or state.position >= max_length
                finish = "length" if at_limit else None  # after a stop, the reply goes on from the new span
            opened_at, mark = None, None
        if opened_at is None:
            for index in range(yielded, len(reply)):
                last = index == len(reply) - 1 and finish != "stop"
                now = time.perf_counter()
                yield Step(reply[index], index, now - started, first_position + index + 1, finish if last else None)
                started = time.perf_counter()
            yielded = len(reply)
            if finish == "stop":
                now = time.perf_counter()
                yield Step(token, len(reply), now - started, state.position, finish)
            if finish is not None:
                return
        token = following


def _stream_looking_ahead(decoder, token, state, sampling, generator, stops, max_new_tokens, cancel, started):
    """stream_tokens' decode loop (without a span rewriter) on a decoder that looks ahead: the step that
    feeds a token's choice is replayed before the host reads that choice, so the GPU never waits for the
    host; when the choice turns out not to be fed (a stop token, a cancelled reply), the step is taken
    back. The same tokens, draws, Steps and final state as the loop in stream_tokens."""
    max_length = decoder.model.config.model_max_length
    first_position = state.position
    reply: list[int] = []
    fed_ahead = None  # the number of a step replayed ahead of the host, feeding `token`
    while True:
        cancelled = is_cancelled(cancel)
        if cancelled or state.position - (fed_ahead is not None) >= max_length or token in stops:
            if fed_ahead is not None:
                decoder.undo()
            if token in stops and not cancelled and state.position < max_length:
                yield Step(token, len(reply), time.perf_counter() - started, state.position, "stop")
            return
        reply.append(token)
        if fed_ahead is None:
            decoder.step(token, draw_uniform(sampling, generator))
            this_step = decoder.last_step
        else:
            this_step = fed_ahead
        finish = "length" if len(reply) >= max_new_tokens or state.position >= max_length else None
        finish = finish or ("repetition" if repeats_itself(reply) else None)
        fed_ahead = None if finish else decoder.step_own_choice(draw_uniform(sampling, generator))
        following = decoder.choice(this_step)
        yield Step(token, len(reply) - 1, time.perf_counter() - started, first_position + len(reply), finish)
        started = time.perf_counter()
        if finish is not None:
            return
        token = following


@dataclass
class Generation:
    """A whole generation, collected. finish_reason: "stop", "length", "repetition" or "cancelled"."""

    token_ids: list[int] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    finish_reason: str = "cancelled"


def generate(
    model: KimiLinearForCausalLM,
    prompt_ids: Sequence[int] | torch.Tensor,
    state: ModelState,
    *,
    cancel: Cancel = None,
    **options,
) -> Generation:
    """stream_tokens, run to the end: `options` are its other keyword arguments (max_new_tokens,
    sampling, ...). The state contract is the same."""
    result = Generation()
    for step in stream_tokens(model, prompt_ids, state, cancel=cancel, **options):
        result.token_ids.append(step.token_id)
        result.steps.append(step)
        if step.finish_reason is not None:
            result.finish_reason = step.finish_reason
    if not result.steps or result.steps[-1].finish_reason is None:
        # The stream ended without a final step: cancelled, or no budget or context left to start.
        result.finish_reason = "cancelled" if is_cancelled(cancel) else "length"
    return result
