"""Citations against what a session read: every place an answer names is found at the version read or
marked not found with the reason, after the files change on disk too; what only might be a file name
is not a citation."""

import dataclasses

import pytest

from kimi_desk.engine.citations import SourceIndex
from kimi_desk.engine.session import Assistant, SessionStore

CONFIG = '''"""Configuration."""

import json


class Config:
    def load(self, path):
        return parse_config(open(path).read())


def parse_config(text):
    return json.loads(text)
'''
MAIN = '''from app.config import Config


def main():
    Config().load("settings.json")
'''


@pytest.fixture(scope="module")
def session(chat_checkpoint, tmp_path_factory):
    """A real folder read by the engine (what `kimi-desk ingest` does)."""
    root = tmp_path_factory.mktemp("cite")
    folder = root / "project"
    (folder / "app").mkdir(parents=True)
    (folder / "app" / "config.py").write_text(CONFIG)
    (folder / "app" / "main.py").write_text(MAIN)
    (folder / "README.md").write_text("# Project\n\nRun `python -m app.main`.\n")
    assistant = Assistant.load(chat_checkpoint, prefill_chunk=64, checkpoint_interval=100)
    return assistant.read(SessionStore(root / "home"), folder)


ANSWER = (
    "The configuration is parsed by `parse_config` in app/config.py:11-12, called from `Config.load` "
    "(config.py:8). main.py:4 builds it. Nothing in lib/settings.py:3 or app/config.py:90 does; "
    "see README.md, e.g. the docs at https://example.com/app/config.py:3, version 3.11, and `len`."
)


def places(citations):
    return [(c.text, c.label, c.found) for c in citations]


def test_every_place_is_found_or_marked_not_found(session):
    citations = SourceIndex(session).cite(ANSWER)
    assert places(citations) == [
        ("parse_config", "app/config.py:11", True),
        ("app/config.py:11-12", "app/config.py:11-12", True),
        ("Config.load", "app/config.py:7", True),
        ("config.py:8", "app/config.py:8", True),
        ("main.py:4", "app/main.py:4", True),
        ("lib/settings.py:3", "lib/settings.py:3", False),
        ("app/config.py:90", "app/config.py:90", False),
        ("README.md", "README.md", True),
    ]
    reasons = {c.text: c.reason for c in citations if not c.found}
    assert reasons == {
        "lib/settings.py:3": "lib/settings.py is not among the files read",
        "app/config.py:90": "app/config.py has 12 lines, no line 90",
    }
    index = SourceIndex(session)
    assert index.lines("app/config.py")[10] == "def parse_config(text):"


def test_places_resolve_at_the_version_read_after_the_files_change(session):
    path = f"{session.source}/app/config.py"
    with open(path, "w") as fh:
        fh.write("# rewritten\n")
    assert [(c.label, c.found) for c in SourceIndex(session).cite("app/config.py:11")] == [("app/config.py:11", True)]
    assert SourceIndex(session).text("app/config.py") == CONFIG
    # A session read before texts were kept falls back to the file on disk, while it is the one read.
    older = dataclasses.replace(
        session, files=[{k: v for k, v in f.items() if k != "text_sha256"} for f in session.files]
    )
    assert SourceIndex(older).text("app/config.py") is None
    cited = SourceIndex(older).cite("app/config.py:11")[0]
    assert not cited.found and "not kept and the file changed since" in cited.reason
    assert SourceIndex(older).text("app/main.py") == MAIN
