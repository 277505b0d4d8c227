"""Threads end to end on a tiny model with a real tokenizer: a follow-up is answered after the earlier
turns; the document's cache is shared, never copied; a thread resumes in a fresh process exactly, and a
thread rebuilt from its transcript equals the saved one; regenerating, editing, cancelling and two
processes answering in one thread at once all leave every thread a conversation the model really had."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from kimi_desk.engine import chat
from kimi_desk.engine.generate import stream_tokens
from kimi_desk.engine.session import Assistant, SessionStore
from kimi_desk.engine.state import KDAState, MLACache

FIRST = "What does helper_3 return?"
FOLLOW_UP = "And where is it called?"
THIRD = "Which file defines helper_4?"


@pytest.fixture
def assistant(chat_checkpoint):
    return Assistant.load(chat_checkpoint, prefill_chunk=64, checkpoint_interval=100)


@pytest.fixture
def session(assistant, tmp_path, monkeypatch):
    monkeypatch.setenv("KIMI_DESK_HOME", str(tmp_path / "home"))
    folder = tmp_path / "repo"
    folder.mkdir()
    for i in range(8):
        (folder / f"file_{i}.py").write_text(f"def helper_{i}():\n    return {i * 7} + helper_{(i + 1) % 8}()\n")
    return assistant.read(SessionStore(), folder)


def ask(assistant, session, question, thread=None, notes=None, **options):
    """(answer ids, thread id) of one question, greedy, at most 10 tokens."""
    events = list(
        assistant.ask(
            session,
            question,
            thread=thread,
            max_new_tokens=10,
            notice=(notes.append if notes is not None else None),
            **options,
        )
    )
    thread = events[-1].thread
    return session.thread(thread).turns[-1].answer_token_ids, thread


def test_a_follow_up_is_answered_after_the_document_and_the_earlier_turn(assistant, session):
    """The follow-up's answer is what greedy decoding gives after the document, the first question, its
    answer and the follow-up, fed from scratch as one conversation in the chat format."""
    first, thread = ask(assistant, session, FIRST)
    second, again = ask(assistant, session, FOLLOW_UP, thread)
    assert again == thread and len(session.thread(thread).turns) == 2

    tokenizer = assistant.tokenizer
    conversation = chat.question_ids(tokenizer, FIRST) + first + chat.follow_up_ids(tokenizer, FOLLOW_UP)
    state = assistant.document_state(session).clone()
    steps = stream_tokens(
        assistant.model,
        conversation,
        state,
        max_new_tokens=10,
        stop_token_ids=assistant.stop_ids,
        vocab_size=assistant.tokenizer.vocab_size,
    )
    expected = [step.token_id for step in steps if step.finish_reason != "stop"]
    assert second == expected
    assert session.thread(thread).tokens == len(conversation) + len(second)


def test_the_document_cache_is_shared_by_threads_never_copied(assistant, session):
    document = assistant.document_state(session)
    caches = [layer for layer in document.layers if isinstance(layer, MLACache)]
    storage = [cache.buffer.data_ptr() for cache in caches]
    rows = [cache.latents.clone() for cache in caches]
    a1, a = ask(assistant, session, FIRST)
    b1, b = ask(assistant, session, THIRD)  # a second thread takes the rows after the document
    live = assistant.thread_state(session, a)  # and the first comes back from its snapshot
    assert all(
        layer.shares_rows_with(cache)
        for layer, cache in zip([x for x in live.layers if isinstance(x, MLACache)], caches)
    )
    assert [cache.buffer.data_ptr() for cache in caches] == storage
    assert all(torch.equal(cache.latents, before) for cache, before in zip(caches, rows))
    assert live.position == session.document_tokens + session.thread(a).tokens

    # Continuing the first thread after the detour gives what a fresh process gives.
    a2, _ = ask(assistant, session, FOLLOW_UP, a)
    fresh = Assistant.load(assistant.model_source, prefill_chunk=64, checkpoint_interval=100)
    regenerated, same = ask(fresh, SessionStore().get(session.id), FOLLOW_UP, a, index=1)
    assert (regenerated, same) == (a2, a)


FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    from kimi_desk.engine.session import Assistant, SessionStore
    assistant = Assistant.load(sys.argv[1], prefill_chunk=64, checkpoint_interval=100)
    session = SessionStore().get(sys.argv[2])
    notes = []
    events = list(assistant.ask(session, sys.argv[4], thread=sys.argv[3], index=int(sys.argv[5]), max_new_tokens=10,
                                notice=notes.append))
    print(json.dumps({"ids": session.thread(events[-1].thread).turns[-1].answer_token_ids,
                      "thread": events[-1].thread, "notes": notes}))
    """
)


def continue_in_fresh_process(checkpoint, session, thread, question, index):
    out = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(checkpoint), session.id, thread, question, str(index)],
        capture_output=True,
        text=True,
        check=True,
        env={"KIMI_DESK_HOME": str(session.folder.parent.parent), "PATH": "/usr/bin:/bin"},
    )
    return json.loads(out.stdout)


def test_a_thread_continues_in_a_fresh_process_as_it_would_have_here(assistant, session, chat_checkpoint):
    """Temperature 0: the third turn asked in a fresh process (restored from the thread's snapshot)
    equals the third turn asked here, in the process that held the thread in memory."""
    _, thread = ask(assistant, session, FIRST)
    ask(assistant, session, FOLLOW_UP, thread)
    third, _ = ask(assistant, session, THIRD, thread)
    fresh = continue_in_fresh_process(chat_checkpoint, session, thread, THIRD, 2)  # regenerates turn 3
    assert fresh == {"ids": third, "thread": thread, "notes": []}


def test_a_thread_rebuilt_from_its_transcript_equals_the_saved_one(assistant, session):
    _, thread = ask(assistant, session, FIRST)
    ask(assistant, session, FOLLOW_UP, thread)
    fresh = Assistant.load(assistant.model_source, prefill_chunk=64, checkpoint_interval=100)
    saved = fresh.thread_state(session, thread).clone()

    for path in (session.folder / "threads" / thread).glob("kda-*"):
        path.write_bytes(path.read_bytes()[:-5])  # damaged: the saved state cannot be used
    notes = []
    again = Assistant.load(assistant.model_source, prefill_chunk=64, checkpoint_interval=100)
    rebuilt = again.thread_state(session, thread, notice=notes.append)
    assert len(notes) == 1 and f"thread {thread}: its saved state cannot be used" in notes[0]
    assert "rebuilt from its 2 turns" in notes[0] and "\n" not in notes[0]
    assert rebuilt.position == saved.position
    for a, b in zip(rebuilt.layers, saved.layers):
        if isinstance(a, KDAState):
            torch.testing.assert_close(a.recurrent, b.recurrent, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(a.conv, b.conv, rtol=1e-4, atol=1e-5)
        else:
            torch.testing.assert_close(a.latents, b.latents, rtol=1e-4, atol=1e-5)
    # The next answer is the same either way, and the thread is saved again.
    third, _ = ask(again, session, THIRD, thread)
    reference, _ = ask(fresh, SessionStore().get(session.id), THIRD, thread, index=2)
    assert third == reference


def test_regenerating_the_last_turn_restarts_from_the_state_before_it(assistant, session):
    first, thread = ask(assistant, session, FIRST)
    second, _ = ask(assistant, session, FOLLOW_UP, thread)
    notes = []
    assert ask(assistant, session, FOLLOW_UP, thread, notes, index=1) == (second, thread)
    assert [t.answer_token_ids for t in session.thread(thread).turns] == [first, second] and notes == []
    # Editing the first question starts a new thread from the document; the conversation is kept.
    edited, other = ask(assistant, session, FIRST, thread, notes, index=0)
    assert other != thread and edited == first and len(notes) == 1
    assert len(session.thread(thread).turns) == 2 and len(session.thread(other).turns) == 1


def test_a_question_stopped_while_it_is_read_leaves_the_thread_whole(assistant, session):
    """Stopped between prefill chunks of a long question: the rest of the question is read, so the
    thread's state holds exactly its transcript, and the next turn is answered as after a fresh start."""
    _, thread = ask(assistant, session, FIRST)
    long_question = "Please explain " + "the helpers and the files that call them, " * 12
    chunks = []
    events = list(
        assistant.ask(
            session, long_question, thread=thread, max_new_tokens=10, cancel=lambda: chunks.append(1) or len(chunks) > 1
        )
    )
    assert events[-1].finish_reason == "cancelled" and session.thread(thread).turns[-1].answer_token_ids == []
    live = assistant.thread_state(session, thread)
    assert live.position == session.document_tokens + session.thread(thread).tokens
    third, _ = ask(assistant, session, THIRD, thread)
    fresh = Assistant.load(assistant.model_source, prefill_chunk=64, checkpoint_interval=100)
    assert ask(fresh, SessionStore().get(session.id), THIRD, thread, index=2)[0] == third


def test_two_answers_in_one_thread_at_once_keep_two_consistent_threads(assistant, session):
    """Two processes (two assistants here) continue one thread at once: the second answer, which did not
    see the first, starts a new thread with what it saw; both threads then resume from their own saved
    state, without rebuilding."""
    _, thread = ask(assistant, session, FIRST)
    other = Assistant.load(assistant.model_source, prefill_chunk=64, checkpoint_interval=100)
    mine = assistant.ask(session, FOLLOW_UP, thread=thread, max_new_tokens=10)
    theirs_session = SessionStore().get(session.id)
    theirs = other.ask(theirs_session, THIRD, thread=thread, max_new_tokens=10)
    next(mine), next(theirs)  # both started from the same one-turn thread
    notes = []
    *_, last_mine = mine
    *_, last_theirs = theirs
    assert last_mine.thread == thread and last_theirs.thread != thread
    record = SessionStore().get(session.id)
    assert [t.question for t in record.thread(thread).turns] == [FIRST, FOLLOW_UP]
    assert [t.question for t in record.thread(last_theirs.thread).turns] == [FIRST, THIRD]
    fresh = Assistant.load(assistant.model_source, prefill_chunk=64, checkpoint_interval=100)
    for t in (thread, last_theirs.thread):
        fresh.thread_state(record, t, notice=notes.append)
    assert notes == []


def test_a_document_read_again_rebuilds_its_threads_with_one_line(assistant, session):
    _, thread = ask(assistant, session, FIRST)
    changed = session.folder.parent  # the source folder is recorded in the session
    source = SessionStore().get(session.id).source
    (__import__("pathlib").Path(source) / "file_7.py").write_text("def helper_7():\n    return 'changed'\n")
    again = assistant.read(SessionStore(), source)
    assert again.id == session.id and changed.exists()
    notes = []
    ids, same = ask(assistant, again, FOLLOW_UP, thread, notes)
    assert same == thread and len(notes) == 1 and "rebuilt from its 1 turn " in notes[0]


def test_a_question_adds_only_its_thread_and_a_fixed_working_set(tmp_path):
    """At 250k tokens of cache rows 576 wide (586 MB, float32, on the CPU): a question and a follow-up
    each add far less than a copy of the document state (what every question cost before threads), and
    the document's rows never move."""
    from kimi_desk.bench.random_checkpoint import tiny_config
    from kimi_desk.bench.threads import build_assistant, measure

    config = tiny_config(vocab_size=1024, kv_lora_rank=512, qk_rope_head_dim=64, model_max_length=300_000)
    assistant = build_assistant(config, "cpu", torch.float32)
    result = measure(
        assistant, SessionStore(tmp_path / "home"), 250_000, new_tokens=4, questions=("Where is it?", "And then?")
    )
    cache = result["mla_cache_bytes"]
    assert result["copy_added_bytes"] > 0.9 * cache and not result["document_moved"]
    for question in result["questions"]:
        assert question["peak_added_bytes"] < 0.5 * cache, question


def test_a_reading_and_an_answer_in_another_session_take_turns(assistant, session, tmp_path):
    """One model, one queue: an answer while another session is read is the answer given alone."""
    import threading

    alone, _ = ask(assistant, session, FIRST)
    folder = tmp_path / "other"
    folder.mkdir()
    for i in range(30):
        (folder / f"mod_{i}.py").write_text(f"VALUE_{i} = {i * 11}\n")
    read = []
    reading = threading.Thread(target=lambda: read.append(assistant.read(SessionStore(), folder)))
    reading.start()
    during, _ = ask(assistant, session, FIRST)
    reading.join(timeout=120)
    assert during == alone and read and read[0].complete
