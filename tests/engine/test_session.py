"""Sessions end to end on a tiny model with a real tokenizer: read, ask, resume in a fresh process,
export and import, re-read a changed folder from its first changed file, cancel and resume."""

import json
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from kimi_desk.engine.ingest import LoaderLimits
from kimi_desk.engine.session import Assistant, ReadCancelled, SessionError, SessionStore
from kimi_desk.engine.token_budget import DocumentTooLong

QUESTION = "What does the helper in file_25 return?"


@pytest.fixture
def assistant(chat_checkpoint):
    # Small chunks and checkpoint intervals, so that a small folder exercises every mechanism.
    return Assistant.load(chat_checkpoint, prefill_chunk=64, checkpoint_interval=100)


def make_folder(root, n_files=50):
    root.mkdir()
    for i in range(n_files):
        (root / f"file_{i:02d}.py").write_text(f"def helper_{i}():\n    return {i * 7} + len('{'x' * (i % 5)}')\n")
    return root


def answer_ids(assistant, session, question=QUESTION, max_new_tokens=12, **options):
    events = list(assistant.ask(session, question, max_new_tokens=max_new_tokens, **options))
    assert events[-1].finish_reason in ("stop", "length")
    return session.thread(events[-1].thread).turns[-1].answer_token_ids


FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    from kimi_desk.engine.session import Assistant, SessionStore
    assistant = Assistant.load(sys.argv[1], prefill_chunk=64, checkpoint_interval=100)
    session = SessionStore().get(sys.argv[2])
    events = list(assistant.ask(session, sys.argv[3], max_new_tokens=12))
    print(json.dumps(session.thread(events[-1].thread).turns[-1].answer_token_ids))
    """
)


def ask_in_fresh_process(checkpoint, session_id, home):
    env = {"KIMI_DESK_HOME": str(home), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(checkpoint), session_id, QUESTION],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(out.stdout)


def test_resume_in_a_fresh_process_and_after_export_import(assistant, chat_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("KIMI_DESK_HOME", str(tmp_path / "home"))
    folder = make_folder(tmp_path / "repo", 12)
    store = SessionStore()
    session = assistant.read(store, folder)
    assert session.complete and session.document_tokens > 300
    expected = answer_ids(assistant, session)
    assert len(expected) > 0

    assert ask_in_fresh_process(chat_checkpoint, session.id, tmp_path / "home") == expected

    archive = store.export(session.id, tmp_path / "session.zip")
    with pytest.raises(SessionError, match="already exists"):
        store.export(session.id, archive)
    other_home = tmp_path / "elsewhere"
    imported = SessionStore(other_home).import_(archive)
    assert imported.name == "repo" and imported.turns == 2  # asked here and in the fresh process
    assert ask_in_fresh_process(chat_checkpoint, imported.id, other_home) == expected


def test_changed_file_is_reread_from_that_file_on(assistant, tmp_path):
    folder = make_folder(tmp_path / "repo", 50)
    store = SessionStore(tmp_path / "home")
    planned = []
    session = assistant.read(store, folder, on_plan=lambda s, tokens, notices: planned.append(tokens))
    total = session.document_tokens
    assert planned == [total]

    changed = folder / "file_25.py"
    changed.write_text(changed.read_text().replace("return 175", "return 176"))
    session = assistant.read(store, folder, on_plan=lambda s, tokens, notices: planned.append(tokens))
    file_25 = next(f for f in session.files if f["path"] == "file_25.py")
    last_checkpoint = max(p for p in session.snapshots().positions if p <= file_25["start"])
    assert planned[-1] == session.document_tokens - last_checkpoint
    assert 0 < planned[-1] < total - file_25["start"] + assistant.checkpoint_interval + 40

    # The state equals a full re-read of the changed folder, in another store.
    fresh = assistant.read(SessionStore(tmp_path / "other"), folder)
    probe = torch.tensor([[5, 6, 7]])
    a = assistant.document_state(session).clone()
    b = assistant.document_state(fresh).clone()
    assert torch.equal(assistant.model(probe, a), assistant.model(probe, b))

    # Nothing changed: nothing to read.
    assistant.read(store, folder, on_plan=lambda s, tokens, notices: planned.append(tokens))
    assert planned[-1] == 0


def test_cancelled_reading_resumes(assistant, tmp_path):
    folder = make_folder(tmp_path / "repo", 30)
    store = SessionStore(tmp_path / "home")
    cancel = threading.Event()
    seen = []

    def progress(p):
        seen.append(p)
        if p.tokens_done > p.tokens_total // 2:
            cancel.set()

    with pytest.raises(ReadCancelled):
        assistant.read(store, folder, on_progress=progress, cancel=cancel)
    (session,) = store.list()
    assert not session.complete and 0 < session.read_position < session.document_tokens
    assert seen[-1].files_total == 30 and seen[-1].tokens_per_second > 0

    planned = []
    session = assistant.read(store, folder, on_plan=lambda s, tokens, notices: planned.append(tokens))
    assert session.complete
    assert planned[0] == session.document_tokens - session.snapshots().latest_at_or_before(seen[-1].tokens_done)
    whole = assistant.read(SessionStore(tmp_path / "other"), folder)
    probe = torch.tensor([[9, 10]])
    a = assistant.model(probe, assistant.document_state(session).clone())
    b = assistant.model(probe, assistant.document_state(whole).clone())
    assert ((a - b).norm() / b.norm()).item() < 1e-4


def test_a_document_over_the_context_is_refused(assistant, tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("lorem ipsum dolor sit amet " * 3000)
    with pytest.raises(
        DocumentTooLong,
        match=r"big.txt is too long for this model: its [\d,]+ characters are "
        r"[\d,]+ tokens, and it reads at most 3,0\d\d before a question",
    ):
        assistant.read(SessionStore(tmp_path / "home"), big)
    assert SessionStore(tmp_path / "home").list() == []


def test_what_the_limits_left_out_is_given_to_on_plan(assistant, tmp_path):
    folder = make_folder(tmp_path / "repo", 8)
    (folder / "big.py").write_text("x = 1\n" * 400)
    planned = []
    limits = LoaderLimits(max_files=5, max_file_bytes=1000)
    session = assistant.read(
        SessionStore(tmp_path / "home"),
        folder,
        limits=limits,
        on_plan=lambda s, tokens, notices: planned.append(notices),
    )
    assert [f["path"] for f in session.files] == [f"file_{i:02d}.py" for i in range(5)]
    assert [(notice.limit, notice.files) for notice in planned[0]] == [("max_files", 3), ("max_file_bytes", 1)]
    assert planned[0][0].message == "3 files not read: the limit of 5 files was reached"


def test_a_huge_file_is_refused_before_it_is_tokenized_whole(assistant, tmp_path, monkeypatch):
    # 6 MB of text let through by a raised --max-total-bytes; the tiny model reads 3,072 tokens.
    huge = tmp_path / "huge.txt"
    line = "lorem ipsum dolor sit amet, consectetur adipiscing elit 0123456789\n"
    huge.write_text(line * (6_000_000 // len(line)))
    encode, encoded = assistant.tokenizer.encode, []
    monkeypatch.setattr(
        assistant.tokenizer, "encode", lambda text, **options: encoded.append(len(text)) or encode(text, **options)
    )
    with pytest.raises(
        DocumentTooLong,
        match=r"^huge.txt is too long for this model: its first 400,\d\d\d "
        r"characters \(of 6,0\d\d,\d\d\d\) are already [\d,]+ tokens, and "
        r"it reads at most 3,0\d\d before a question$",
    ):
        assistant.read(SessionStore(tmp_path / "home"), huge, limits=LoaderLimits(max_total_bytes=64 << 20))
    # Only the head, the (empty) preamble and the file's first slice reached the tokenizer.
    assert sum(encoded) < 500_000
    assert SessionStore(tmp_path / "home").list() == []


def test_sessions_rename_remove_and_bad_ids(assistant, tmp_path):
    store = SessionStore(tmp_path / "home")
    session = assistant.read(store, make_folder(tmp_path / "repo", 3))
    assert store.rename(session.id, "  my repo ").name == "my repo"
    assert [s.name for s in store.list()] == ["my repo"]
    with pytest.raises(SessionError, match="cannot be empty"):
        store.rename(session.id, " ")
    for bad in ("../etc", "", "nope"):
        with pytest.raises(SessionError):
            store.get(bad)
    store.remove(session.id)
    assert store.list() == []


def test_import_refuses_archives_that_escape(tmp_path):
    import zipfile

    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("session.json", "{}")
        zf.writestr("../../outside.txt", "x")
    with pytest.raises(SessionError, match="unexpected member"):
        SessionStore(tmp_path / "home").import_(archive)
    with pytest.raises(SessionError, match="not a kimi-desk session archive"):
        (tmp_path / "junk.zip").write_bytes(b"not a zip")
        SessionStore(tmp_path / "home").import_(tmp_path / "junk.zip")


def test_damaged_snapshot_is_refused_then_read_again(assistant, tmp_path):
    folder = make_folder(tmp_path / "repo", 6)
    store = SessionStore(tmp_path / "home")
    session = assistant.read(store, folder)
    expected = answer_ids(assistant, session)
    snapshot_dir = session.folder / "snapshots"
    for f in snapshot_dir.glob("kda-*.safetensors"):
        data = bytearray(f.read_bytes())
        data[-3] ^= 1
        f.write_bytes(bytes(data))

    fresh = Assistant.load(assistant.model_source, prefill_chunk=64, checkpoint_interval=100)
    with pytest.raises(SessionError, match="damaged .* reads the document again"):
        list(fresh.ask(store.get(session.id), QUESTION))
    planned = []
    again = fresh.read(store, folder, on_plan=lambda s, tokens, notices: planned.append(tokens))
    assert planned == [again.document_tokens]  # read from the start
    assert answer_ids(fresh, again) == expected
    assert again.turns == 2  # nothing the user had is lost

    (session.folder / "snapshots" / "manifest.json").write_text("garbage")
    again = fresh.read(store, folder)
    assert again.complete and list(session.folder.glob("snapshots.damaged-*"))


def test_checkpoints_are_spaced_by_the_size_of_the_state():
    """8192 tokens for small models; the 48B model's 42 MB KDA state against 8 KB of cache a token
    spreads them to about every 42k tokens, so checkpoints stay within an eighth of the snapshot."""
    from kimi_desk.bench.random_checkpoint import kimi_linear_48b_config, tiny_config
    from kimi_desk.engine.session import default_checkpoint_interval

    assert default_checkpoint_interval(tiny_config(), torch.float32) == 8192
    config = kimi_linear_48b_config()
    interval = default_checkpoint_interval(config, torch.bfloat16)
    assert 40_000 < interval < 50_000
    kda_bytes, cache_bytes_per_token = 20 * 32 * 128 * 128 * 4, 7 * 576 * 2
    assert kda_bytes / (interval * cache_bytes_per_token) <= 1 / 8


def test_removing_a_session_while_it_answers_keeps_it_removed(assistant, tmp_path):
    store = SessionStore(tmp_path / "home")
    session = assistant.read(store, make_folder(tmp_path / "repo", 4))
    stream = assistant.ask(session, QUESTION, max_new_tokens=8)
    next(stream)
    store.remove(session.id)
    with pytest.raises(SessionError, match="was removed"):
        list(stream)
    assert not session.folder.exists() and store.list() == [] and store.unreadable() == []


def test_an_answer_that_cannot_be_asked_records_no_turn(assistant, tmp_path):
    store = SessionStore(tmp_path / "home")
    session = assistant.read(store, make_folder(tmp_path / "repo", 3))
    for bad in (-5, 0):
        with pytest.raises(SessionError, match="at least 1 token"):
            list(assistant.ask(session, QUESTION, max_new_tokens=bad))
    assert store.get(session.id).threads == []


def test_one_process_at_a_time_reads_a_session(assistant, tmp_path):
    store = SessionStore(tmp_path / "home")
    folder = make_folder(tmp_path / "repo", 3)
    session = assistant.read(store, folder)
    (folder / "file_01.py").write_text("def helper_1():\n    return 'changed'\n")
    with store.reading(session.id):  # as another process reading it would
        with pytest.raises(SessionError, match="being read by another kimi-desk"):
            assistant.read(store, folder)
    again = assistant.read(store, folder)
    assert again.id == session.id and again.complete


def test_no_time_left_is_said_before_the_first_chunk_is_read(assistant, tmp_path):
    """The first chunk pays one-time costs: a time left measured on it swings wildly, so none is given
    until it is read; from then on every report gives one."""
    seen = []
    assistant.read(SessionStore(tmp_path / "home"), make_folder(tmp_path / "repo", 40), on_progress=seen.append)
    assert len(seen) > 3 and seen[0].seconds_left is None and seen[0].tokens_per_second > 0
    assert all(p.seconds_left is not None for p in seen[1:])


class CountingModel:
    """The model, recording the length of every call."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, ids, state, **options):
        self.calls.append(ids.shape[1])
        return self.model(ids, state, **options)


def test_calls_span_files_and_checkpoints_sit_at_file_boundaries(chat_checkpoint, tmp_path, monkeypatch):
    """A folder of small files is read in calls of prefill_chunk tokens across files (a call per file
    would pay the per-call costs per file); each checkpoint sits at a file boundary, at least
    checkpoint_interval tokens after the one before, and the last at the end."""
    assistant = Assistant.load(chat_checkpoint, prefill_chunk=256, checkpoint_interval=600)
    counting = CountingModel(assistant.model)
    monkeypatch.setattr(assistant, "model", counting)
    session = assistant.read(SessionStore(tmp_path / "home"), make_folder(tmp_path / "repo", 50))
    total, ends = session.document_tokens, {segment.end for segment in session.segments}
    positions = session.snapshots().positions
    assert sum(counting.calls) == total and max(counting.calls) <= assistant.prefill_chunk
    assert len(counting.calls) <= -(-total // assistant.prefill_chunk) + len(positions) < 25
    assert positions[-1] == total and set(positions) <= ends
    assert all(b - a >= assistant.checkpoint_interval for a, b in zip([0] + positions, positions[:-1]))


def test_a_session_read_under_one_placement_resumes_under_another(chat_checkpoint, tmp_path):
    """Where the routed experts live (engine/offload.py) changes nothing in the state or the snapshots."""
    from kimi_desk.engine.placement import Placement

    def placed(gpu_experts):
        plan = Placement(num_experts=8, gpu_experts=gpu_experts, fixed_bytes=0, expert_bytes=1, staging_bytes=0)
        return Assistant.load(chat_checkpoint, prefill_chunk=64, checkpoint_interval=100, placement=plan)

    folder = make_folder(tmp_path / "repo", 6)
    store = SessionStore(tmp_path / "home")
    first = placed({1: (0, 1), 2: (), 3: (3, 4, 5, 6, 7)})
    assert first.model.offload is not None
    session = first.read(store, folder)
    whole = Assistant.load(chat_checkpoint, prefill_chunk=64, checkpoint_interval=100)
    expected = answer_ids(whole, whole.read(SessionStore(tmp_path / "other"), folder))
    assert answer_ids(placed({1: (5,), 2: (0, 1, 2, 3, 4, 5, 6), 3: ()}), session) == expected
    assert answer_ids(whole, store.get(session.id)) == expected


def test_the_gpu_running_out_of_memory_is_one_line_and_keeps_the_session(assistant, tmp_path, monkeypatch):
    from kimi_desk.engine.errors import GpuMemoryError, UserError

    store = SessionStore(tmp_path / "home")
    session = assistant.read(store, make_folder(tmp_path / "repo", 6))
    answer_ids(assistant, session)
    before = [len(t.turns) for t in session.threads]

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 70.00 MiB.")

    monkeypatch.setattr(assistant.model, "forward", out_of_memory)
    with pytest.raises(GpuMemoryError, match="ran out of memory while answering") as raised:
        list(assistant.ask(session, QUESTION, max_new_tokens=4))
    assert isinstance(raised.value, UserError) and "\n" not in str(raised.value)
    monkeypatch.undo()
    # The earlier thread is untouched, and the session still answers.
    again = store.get(session.id)
    assert [len(t.turns) for t in again.threads][: len(before)] == before
    assert answer_ids(assistant, again)


def test_the_gpu_running_out_of_memory_while_reading_is_one_line(assistant, tmp_path, monkeypatch):
    from kimi_desk.engine.errors import GpuMemoryError

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(assistant.model, "forward", out_of_memory)
    with pytest.raises(GpuMemoryError, match="while reading"):
        assistant.read(SessionStore(tmp_path / "home"), make_folder(tmp_path / "repo", 3))
