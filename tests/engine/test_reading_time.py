"""The reading estimate: a cost model whose chunk time grows with the tokens already read, measured
cheaply and summed over the document, checked against a fake model whose per-chunk time grows linearly
with its position, on a fake clock."""

from types import SimpleNamespace

import pytest
import torch

from kimi_desk.engine import reading_time
from kimi_desk.engine.reading_time import ReadingCost, measure_reading_cost, state_with_cache
from kimi_desk.engine.state import MLACache, ModelState


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class LinearModel:
    """A call of T tokens after `cached` advances the clock by T * (per_token + per_cached * cached)."""

    def __init__(self, clock, per_token, per_cached):
        self.clock, self.per_token, self.per_cached = clock, per_token, per_cached
        self.config = SimpleNamespace(vocab_size=100)
        self.device = torch.device("cpu")

    def new_state(self, batch_size=1):
        return ModelState([])

    def __call__(self, ids, state, last_only=False):
        T = ids.shape[1]
        self.clock.now += T * (self.per_token + self.per_cached * state.position)
        state.position += T


def read_on_the_fake(model, tokens, start, chunk):
    """The fake clock's time for reading `tokens` after `start`, call by call as a reading goes."""
    state, started = model.new_state(), model.clock.now
    state.position = start
    for a in range(0, tokens, chunk):
        model(torch.zeros(1, min(chunk, tokens - a), dtype=torch.long), state)
    return model.clock.now - started


@pytest.fixture
def fake(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(reading_time, "_clock", clock)
    return LinearModel(clock, per_token=4e-4, per_cached=8e-9)


def test_measurement_recovers_the_linear_growth(fake):
    cost = measure_reading_cost(fake, chunk=2048)
    assert cost.per_token == pytest.approx(4e-4, rel=1e-9)
    assert cost.per_cached == pytest.approx(8e-9, rel=1e-6)


@pytest.mark.parametrize("tokens,start", [(1, 0), (2047, 0), (2048, 0), (2049, 100), (214_000, 0), (90_000, 50_000)])
def test_estimate_equals_the_reading(fake, tokens, start):
    cost = measure_reading_cost(fake, chunk=2048)
    assert cost.seconds(tokens, start) == pytest.approx(read_on_the_fake(fake, tokens, start, 2048), rel=1e-6)


def test_long_documents_read_slower(fake):
    cost = measure_reading_cost(fake, chunk=2048)
    flat = 214_000 * cost.per_token  # what one chunk at an empty state predicts
    assert cost.seconds(214_000) > 2 * flat
    assert cost.rate(214_000) < cost.rate(4096) < cost.rate(2048) == cost.rate(0) == pytest.approx(1 / 4e-4)
    assert cost.rate(0, start=100_000) == pytest.approx(1 / (4e-4 + 8e-9 * 100_000))


def test_a_state_with_a_synthetic_cache(tiny_checkpoint):
    from kimi_desk.engine import load_model

    model = load_model(tiny_checkpoint, dtype=torch.float32)
    state = state_with_cache(model, 300)
    caches = [layer for layer in state.layers if isinstance(layer, MLACache)]
    assert state.position == 300 and caches and all(c.length == 300 for c in caches)
    assert all(torch.isfinite(c.latents).all() and c.latents.std() > 0.5 for c in caches)
    model(torch.tensor([[1, 2, 3]]), state)  # the model continues from it
    assert state.position == 303 and all(c.length == 303 for c in caches)


def test_reading_cost_of_a_real_model_is_positive(tiny_checkpoint):
    from kimi_desk.engine import load_model

    cost = measure_reading_cost(load_model(tiny_checkpoint, dtype=torch.float32), chunk=64, probe=32, cached=256)
    assert isinstance(cost, ReadingCost) and cost.per_token > 0 and cost.per_cached >= 0
