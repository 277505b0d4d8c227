"""The CPU thread count: the idle cores, or what the environment fixes."""

from __future__ import annotations

import pytest
import torch

from kimi_desk.engine import cpu_threads


@pytest.mark.parametrize(
    "cores,busy,expected",
    [(2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 9.0, 1), (16, 3.0, 13), (1, 0.0, 1), (4, -1.0, 4)],
)
def test_threads_are_the_idle_cores(cores, busy, expected):
    assert cpu_threads.threads_for(cores, busy) == expected


def test_the_environment_fixes_the_count(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("KIMI_DESK_THREADS", "1")
    monkeypatch.setattr(
        cpu_threads, "busy_elsewhere", lambda: pytest.fail("the load is not asked when the count is fixed")
    )
    try:
        assert cpu_threads.use_idle_cores() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("value", ["", "0", "two"])
def test_unusable_settings_are_ignored(monkeypatch, value):
    monkeypatch.setenv("KIMI_DESK_THREADS", value)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu_threads.fixed_threads() is None


def test_busy_elsewhere_leaves_out_the_reader():
    busy = cpu_threads.busy_elsewhere()
    assert busy is None or busy >= 0


def test_without_a_load_figure_every_core_is_used(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("KIMI_DESK_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu_threads, "busy_elsewhere", lambda: None)
    try:
        assert cpu_threads.use_idle_cores() == cpu_threads.usable_cores() == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "busy, spin",
    [(0.0, str(cpu_threads.IDLE_SPIN_TURNS)), (0.4, str(cpu_threads.IDLE_SPIN_TURNS)), (0.6, None), (None, None)],
)
def test_threads_sleep_after_a_brief_spin_only_on_idle_cores(monkeypatch, busy, spin):
    """No other task wants a core: a brief spin before sleeping; some other task, or no load figure: sleep."""
    monkeypatch.setattr(cpu_threads, "busy_elsewhere", lambda samples: busy)
    environ = {}
    cpu_threads.choose_wait(environ)
    assert environ.get("OMP_WAIT_POLICY") == "PASSIVE" and environ.get("GOMP_SPINCOUNT") == spin


@pytest.mark.parametrize(
    "given", [{"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "0"}, {"OMP_WAIT_POLICY": "passive"}]
)
def test_a_wait_the_environment_sets_is_kept(monkeypatch, given):
    monkeypatch.setattr(cpu_threads, "busy_elsewhere", lambda samples: 0.0)
    environ = dict(given)
    cpu_threads.choose_wait(environ)
    assert environ == given
