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


def test_two_copies_of_a_session_both_keep_their_threads(store):
    """Two `ask` at once, each starting a thread: each process holds its own copy of the session;
    neither thread is lost."""
    session = store.create("/src", "src", IDENTITY, None)
    first, second = store.get(session.id), store.get(session.id)
    one, _ = first.record_turn(turn("one"))
    two, _ = second.record_turn(turn("two"))
    threads = store.get(session.id).threads
    assert [(t.id, [x.question for x in t.turns]) for t in threads] == [(one, ["one"]), (two, ["two"])]
    assert [t.id for t in second.threads] == [one, two]  # the copy caught up


def test_a_follow_up_continues_its_thread(store):
    session = store.create("/src", "src", IDENTITY, None)
    thread, _ = session.record_turn(turn("one"))
    assert session.record_turn(turn("two"), thread, session.thread(thread).turns) == (thread, False)
    assert [t.question for t in store.get(session.id).thread(thread).turns] == ["one", "two"]


def test_two_follow_ups_of_one_thread_at_once_keep_both_conversations(store):
    """Both answers saw the same turn; the second to arrive goes to a new thread with what it saw, so
    every thread stays a conversation the model had, and nothing is lost."""
    session = store.create("/src", "src", IDENTITY, None)
    thread, _ = session.record_turn(turn("one"))
    first, second = store.get(session.id), store.get(session.id)
    seen = list(first.thread(thread).turns)
    assert first.record_turn(turn("two a"), thread, seen) == (thread, False)
    other, forked = second.record_turn(turn("two b"), thread, seen)
    assert forked and other != thread
    again = store.get(session.id)
    assert [t.question for t in again.thread(thread).turns] == ["one", "two a"]
    assert [t.question for t in again.thread(other).turns] == ["one", "two b"]


def test_regenerating_replaces_the_last_turn_and_editing_an_earlier_one_branches(store):
    session = store.create("/src", "src", IDENTITY, None)
    thread, _ = session.record_turn(turn("one"))
    session.record_turn(turn("two"), thread, session.thread(thread).turns)
    assert session.record_turn(turn("two again"), thread, session.thread(thread).turns, 1) == (thread, False)
    assert [t.question for t in store.get(session.id).thread(thread).turns] == ["one", "two again"]
    edited, forked = session.record_turn(turn("one, edited"), thread, session.thread(thread).turns, 0)
    assert forked and [t.question for t in session.thread(edited).turns] == ["one, edited"]
    assert [t.question for t in session.thread(thread).turns] == ["one", "two again"]  # kept


def test_a_format_1_transcript_reads_as_one_thread_per_question(store):
    """Before threads every question was answered from the document alone: that is a thread each."""
    session = store.create("/src", "src", IDENTITY, None)
    path = session.folder / "session.json"
    payload = json.loads(path.read_text())["payload"]
    del payload["threads"]
    payload["format_version"] = 1
    payload["transcript"] = [vars(turn("one")) | {"tokens": 0}, vars(turn("two"))]
    del payload["transcript"][1]["tokens"]
    body = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    path.write_text(json.dumps({"checksum": hashlib.sha256(body.encode()).hexdigest(), "payload": payload}))
    old = store.get(session.id)
    assert [[t.question for t in thread.turns] for thread in old.threads] == [["one"], ["two"]]
    assert [t.id for t in store.get(session.id).threads] == [t.id for t in old.threads]  # stable until written
    old.record_turn(turn("three"), old.threads[0].id, old.threads[0].turns)
    raw = json.loads(path.read_text())["payload"]
    assert raw["format_version"] == 2 and "transcript" not in raw
    assert [t.question for t in store.get(session.id).threads[0].turns] == ["one", "three"]


def test_a_rename_and_a_reading_update_at_once_keep_both(store):
    session = store.create("/src", "src", IDENTITY, None)
    reader = store.get(session.id)
    store.rename(session.id, "renamed elsewhere")
    reader.update(read_position=0, model_source="/models/m")
    again = store.get(session.id)
    assert again.name == "renamed elsewhere" and again.model_source == "/models/m"


APPEND_MANY = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from kimi_desk.engine.session import SessionStore, Turn
    session = SessionStore(Path(sys.argv[1])).get(sys.argv[2])
    thread = None
    for i in range(int(sys.argv[4])):
        turn = Turn(f"{sys.argv[3]}-{i}", "a", [], "stop", 0.0, "2026-12-03T10:00:00+00:00")
        seen = session.thread(thread).turns if thread else []
        thread, forked = session.record_turn(turn, thread, seen)
        assert not forked
    """
)


def test_processes_appending_at_once_lose_no_turn(store, tmp_path):
    """Four processes each hold a conversation of 25 turns in one session at once."""
    session = store.create("/src", "src", IDENTITY, None)
    workers = [
        subprocess.Popen([sys.executable, "-c", APPEND_MANY, str(tmp_path / "home"), session.id, f"p{w}", "25"])
        for w in range(4)
    ]
    assert [w.wait(timeout=120) for w in workers] == [0, 0, 0, 0]
    threads = store.get(session.id).threads
    assert len(threads) == 4
    for thread in threads:  # each process's turns in its own order, in its own thread
        w = thread.turns[0].question.split("-")[0]
        assert [t.question for t in thread.turns] == [f"{w}-{i}" for i in range(25)]


def test_a_removed_session_is_never_written_again(store):
    session = store.create("/src", "src", IDENTITY, None)
    stale = store.get(session.id)
    store.remove(session.id)
    with pytest.raises(SessionError, match="was removed"):
        stale.record_turn(turn("late"))
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


def test_every_finish_reason_of_the_engine_is_kept(store):
    """Each way generate() ends an answer (engine/generate.py: "repetition" too) is saved and read back."""
    session = store.create("/src", "src", IDENTITY, None)
    for reason in ("stop", "length", "repetition", "cancelled"):
        session.record_turn(Turn(reason, "a", [1], reason, 0.1, "2026-12-03T10:00:00+00:00"))
    assert [t.turns[0].finish_reason for t in store.get(session.id).threads] == [
        "stop",
        "length",
        "repetition",
        "cancelled",
    ]
