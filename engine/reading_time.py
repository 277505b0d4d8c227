"""How long reading a document takes on this device, before reading it.

A prefill chunk's time grows with the tokens already read: every MLA layer attends over all of them, so
a long document reads ever slower than its first chunk suggests (the MLA attention dominates a chunk
after some 10k tokens of the demo model, and its time keeps growing linearly). The time of a chunk of c tokens after p cached tokens is modelled as

    c * (per_token + per_cached * p)

`per_token` is measured on one whole chunk at an empty state (its own causal attention included) and
`per_cached` on a short probe after a synthetic cache of random latents against the same probe at an
empty state: attention costs the same whatever the cached values are, so nothing needs reading first.

    cost = measure_reading_cost(model, chunk=2048)       # about two chunks' time
    seconds = cost.seconds(tokens=214_000, start=0)      # summed chunk by chunk
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kimi_desk.engine.state import MLACache, ModelState

# The probe that measures the growth: PROBE_TOKENS new tokens after PROBE_CACHED cached ones (two MLA
# layers of the demo model: about 0.1 s on two cores).
PROBE_TOKENS = 512
PROBE_CACHED = 16384

# Replaced by tests with a fake clock.
_clock = time.perf_counter


@dataclass(frozen=True)
class ReadingCost:
    """Seconds per token at an empty state, and the seconds each cached token adds to every new token."""

    per_token: float
    per_cached: float
    chunk: int

    def seconds(self, tokens: int, start: int = 0) -> float:
        """Time to read `tokens` tokens after `start`, in chunks of `chunk` tokens."""
        full, rest = divmod(max(tokens, 0), self.chunk)
        # Full chunk k starts at start + k * chunk: sum over k of chunk * (start + k * chunk) cached tokens.
        token_positions = self.chunk * (full * start + self.chunk * full * (full - 1) // 2)
        token_positions += rest * (start + full * self.chunk)
        return tokens * self.per_token + self.per_cached * token_positions

    def rate(self, tokens: int, start: int = 0) -> float:
        """Average tokens per second over that reading; at `start` itself when tokens is 0."""
        if tokens <= 0:
            return 1.0 / (self.per_token + self.per_cached * start)
        return tokens / self.seconds(tokens, start)


def state_with_cache(model, tokens: int, seed: int = 0) -> ModelState:
    """A fresh state whose MLA caches hold `tokens` random latents (KDA states at zero): what attention
    costs after reading that many tokens, without reading them."""
    state = model.new_state(1)
    generator = torch.Generator().manual_seed(seed)
    for layer in state.layers:
        if isinstance(layer, MLACache):
            layer.reserve(tokens + 1)
            width = layer.buffer.shape[-1]
            # Filled in slices: a random float32 copy of a large cache would be 2-4x its size at once.
            for a in range(0, tokens, 65536):
                b = min(tokens, a + 65536)
                layer.buffer[0, a:b] = torch.randn(b - a, width, generator=generator).to(layer.buffer)
            layer.length = tokens
    state.position = tokens
    return state


def measure_reading_cost(model, chunk: int, probe: int = PROBE_TOKENS, cached: int = PROBE_CACHED) -> ReadingCost:
    """Time one chunk at an empty state, and a short probe at an empty state and after `cached` tokens
    (each probe twice, keeping the faster: a busy machine only ever slows a run down)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, max(chunk, probe)), generator=generator).to(model.device)
    model(ids[:, :8], model.new_state(1))  # first-call costs stay out of the figures

    def timed(n: int, state) -> float:
        started = _clock()
        model(ids[:, :n], state, last_only=True)
        return _clock() - started

    per_token = timed(chunk, model.new_state(1)) / chunk
    empty = min(timed(probe, model.new_state(1)) for _ in range(2))
    after = min(timed(probe, state_with_cache(model, cached)) for _ in range(2))
    return ReadingCost(per_token, max(after - empty, 0.0) / (probe * cached), chunk)
