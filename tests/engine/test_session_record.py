"""session.json under concurrent use: no process loses another's turn or rename, a removed session stays
removed, and a damaged record is reported, never hidden or allowed to break the others."""

import hashlib
import json
import subprocess
import sys
import textwrap

import pytest

from kimi_desk.engine.session import SessionError, SessionStore, Turn
from kimi_desk.engine.snapshot import Identity

IDENTITY = Identity("model0fingerprint", "tokenizer0fingerprint")


def turn(question: str) -> Turn:
    return Turn(question, f"answer to {question}", [1, 2], "stop", 0.5, "2026-12-03T10:00:00+00:00")


@pytest.fixture
def store(tmp_path):
    return SessionStore(tmp_path / "home")


def test_two_copies_of_a_session_both_keep_their_turns(store):
    """Two `ask` at once: each process holds its own copy of the session; neither turn is lost."""
    session = store.create("/src", "src", IDENTITY, None)
    first, second = store.get(session.id), store.get(session.id)
    first.append_turn(turn("one"))
    second.append_turn(turn("two"))
    assert [t.question for t in store.get(session.id).transcript] == ["one", "two"]
    assert [t.question for t in second.transcript] == ["one", "two"]  # the copy caught up


def test_a_rename_and_a_reading_update_at_once_keep_both(store):
    session = store.create("/src", "src", IDENTITY, None)
    reader = store.get(session.id)
    store.rename(session.id, "renamed elsewhere")
    reader.update(read_position=0, model_source="/models/m")
    again = store.get(session.id)
    assert again.name == "renamed elsewhere" and again.model_source == "/models/m"


def test_regenerating_replaces_the_last_turn_only(store):
    session = store.create("/src", "src", IDENTITY, None)
    session.append_turn(turn("one"))
    session.append_turn(turn("two"))
    session.append_turn(turn("two again"), replace_last=True)
    assert [t.question for t in store.get(session.id).transcript] == ["one", "two again"]


APPEND_MANY = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from kimi_desk.engine.session import SessionStore, Turn
    session = SessionStore(Path(sys.argv[1])).get(sys.argv[2])
    for i in range(int(sys.argv[4])):
        session.append_turn(Turn(f"{sys.argv[3]}-{i}", "a", [], "stop", 0.0, "2026-12-03T10:00:00+00:00"))
    """
)


def test_processes_appending_at_once_lose_no_turn(store, tmp_path):
    session = store.create("/src", "src", IDENTITY, None)
    workers = [subprocess.Popen([sys.executable, "-c", APPEND_MANY, str(tmp_path / "home"), session.id, f"p{w}", "25"])
               for w in range(4)]
    assert [w.wait(timeout=120) for w in workers] == [0, 0, 0, 0]
    questions = [t.question for t in store.get(session.id).transcript]
    assert len(questions) == 100 and len(set(questions)) == 100
    for w in range(4):  # each process's turns in its own order
        mine = [q for q in questions if q.startswith(f"p{w}-")]
        assert mine == [f"p{w}-{i}" for i in range(25)]


def test_a_removed_session_is_never_written_again(store):
    session = store.create("/src", "src", IDENTITY, None)
    stale = store.get(session.id)
    store.remove(session.id)
    with pytest.raises(SessionError, match="was removed"):
        stale.append_turn(turn("late"))
    with pytest.raises(SessionError, match="was removed"):
        stale.update(read_position=0)
    assert not session.folder.exists() and store.list() == [] and store.unreadable() == []


def test_a_session_being_read_is_not_removed_or_exported(store, tmp_path):
    session = store.create("/src", "src", IDENTITY, None)
    with store.reading(session.id):
        with pytest.raises(SessionError, match="being read by another kimi-desk"):
            store.remove(session.id)
        with pytest.raises(SessionError, match="being read by another kimi-desk"):
            store.export(session.id, tmp_path / "out.zip")
    assert store.get(session.id).id == session.id and not (tmp_path / "out.zip").exists()


def test_a_damaged_record_is_reported_and_the_others_still_list(store):
    good = store.create("/good", "good", IDENTITY, None)
    bad = store.create("/bad", "bad", IDENTITY, None)
    path = bad.folder / "session.json"
    wrapper = json.loads(path.read_text())
    wrapper["payload"]["segments"] = [{"label": "x", "sha256": "0" * 64, "start": "0", "tokens": 5}]
    body = json.dumps(wrapper["payload"], sort_keys=True, separators=(",", ":"))
    wrapper["checksum"] = hashlib.sha256(body.encode()).hexdigest()
    path.write_text(json.dumps(wrapper))
    torn = store.create("/torn", "torn", IDENTITY, None)
    (torn.folder / "session.json").write_text('{"checksum": "')
    assert [s.id for s in store.list()] == [good.id]
    unreadable = {u.id: u.reason for u in store.unreadable()}
    assert set(unreadable) == {bad.id, torn.id}
    assert "segments[0].start must be an integer" in unreadable[bad.id]
    assert "damaged" in unreadable[torn.id]
    with pytest.raises(SessionError, match="segments"):
        store.get(bad.id)
    store.remove(bad.id)  # what the message tells the user to do
    assert {u.id for u in store.unreadable()} == {torn.id}
