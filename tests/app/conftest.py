"""Helpers for driving the app: a private KIMI_DESK_HOME and HOME per test, an app built by the one
factory the command line uses, with the fake engine. Driving helpers are in driving.py."""

from __future__ import annotations

import pytest
from driving import make_test_app
from fake_engine import FakeAssistant


@pytest.fixture
def home(tmp_path, monkeypatch):
    """Sessions and settings in a fresh folder; HOME there too, so paths show as ~/..."""
    monkeypatch.setenv("KIMI_DESK_HOME", str(tmp_path / "kimi-home"))
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


@pytest.fixture
def fake():
    return FakeAssistant()


@pytest.fixture
def make_app(home, fake):
    def make(target=None, *, engine=None, **options):
        return make_test_app(target, engine=engine or fake, **options)

    return make
