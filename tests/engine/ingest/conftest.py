"""Ingestion tests run git to build repositories and to compare the loader's listing with git's (the
loader itself never runs git); make every git they start ignore the user's and the system's
configuration (a global excludes file would change what git lists)."""

import os

import pytest


@pytest.fixture(autouse=True)
def isolated_git_configuration(monkeypatch):
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
