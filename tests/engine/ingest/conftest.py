"""Ingestion tests run git; make every git they start, the loader's included, ignore the user's
and the system's configuration (a global excludes file would change what git lists)."""

import os

import pytest


@pytest.fixture(autouse=True)
def isolated_git_configuration(monkeypatch):
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
