"""Session archives as an attacker writes them: every hostile archive is refused with one line (or
imported safely under an id of ours), nothing is written outside the data folder, nothing is left
behind; and export never overwrites or writes through what is already there."""

import hashlib
import io
import json
import os
import random
import zipfile
from pathlib import Path

import pytest

from kimi_desk.engine.session import Assistant, SessionError, SessionStore


@pytest.fixture(scope="module")
def exported(chat_checkpoint, tmp_path_factory):
    """A real session (a small folder read by the chat model, one question asked), exported."""
    root = tmp_path_factory.mktemp("exported")
    folder = root / "repo"
    folder.mkdir()
    for i in range(6):
        (folder / f"file_{i}.py").write_text(f"def helper_{i}():\n    return {i * 7}\n")
    assistant = Assistant.load(chat_checkpoint, prefill_chunk=64, checkpoint_interval=100)
    store = SessionStore(root / "home")
    session = assistant.read(store, folder)
    list(assistant.ask(session, "What does helper_3 return?", max_new_tokens=4))
    return store.export(session.id, root / "session.zip")


def members_of(archive: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(archive) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def write_archive(path: Path, members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def checked_json(payload) -> bytes:
    """What write_checked_json writes; an attacker recomputes the checksum as easily."""
    body = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    checksum = hashlib.sha256(body.encode()).hexdigest()
    return json.dumps({"checksum": checksum, "payload": payload}).encode()


def with_record(members: dict[str, bytes], change) -> dict[str, bytes]:
    """The archive's members with session.json's payload changed by `change` and re-signed."""
    payload = json.loads(members["session.json"])["payload"]
    change(payload)
    return {**members, "session.json": checked_json(payload)}


def everything_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def sandbox(tmp_path):
    """A data folder inside `tmp_path`, and a check that nothing outside it changed."""
    home = tmp_path / "home"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("untouched")
    store = SessionStore(home)
    before = everything_under(tmp_path.parent / tmp_path.name / "outside")
    yield store, tmp_path
    assert everything_under(outside) == before
    written = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*")}
    assert written <= {"home", "outside", "archives"}, written
    leftovers = [p.name for p in (home / "sessions").glob(".import-*")] if (home / "sessions").is_dir() else []
    assert leftovers == []


def archive_path(tmp_path: Path, name: str = "a.zip") -> Path:
    (tmp_path / "archives").mkdir(exist_ok=True)
    return tmp_path / "archives" / name


@pytest.mark.parametrize(
    "hostile_id", ["../../escaped", "/tmp/escaped-absolute", "..", "", 12345, None, "ab/cd", "ABCDEF12", "x" * 500]
)
def test_an_archived_id_never_chooses_the_folder(exported, sandbox, hostile_id):
    store, tmp_path = sandbox
    archive = write_archive(
        archive_path(tmp_path), with_record(members_of(exported), lambda p: p.update(id=hostile_id))
    )
    session = store.import_(archive)
    assert session.folder.parent == store.root and len(session.id) == 8 and session.id != hostile_id
    assert not Path("/tmp/escaped-absolute").exists()
    assert [s.id for s in store.list()] == [session.id]


def test_the_archived_id_is_kept_when_it_is_ours_and_free_else_a_new_one(exported, sandbox):
    store, _ = sandbox
    first = store.import_(exported)
    assert first.id == json.loads(members_of(exported)["session.json"])["payload"]["id"]
    second = store.import_(exported)
    assert second.id != first.id and {s.id for s in store.list()} == {first.id, second.id}


@pytest.mark.parametrize(
    "extra",
    [
        "evil.sh",
        "snapshots/../../x.safetensors",
        "../x",
        "/etc/cron.d/x",
        "snapshots/sub/kda-000000000001-9.safetensors",
        "snapshots/notes.txt",
        "snapshots/kda-000000000099-99.safetensors",
        "session.json/x",
        "threads/../../x.safetensors",
        "threads/ABCDEF12/manifest.json",
        "threads/0000000a/kda-000000000001-1.safetensors",
        "sources/x.txt",
        "sources/../session.json",
        f"sources/{'0' * 64}.txt",
        "threads/notes.txt",
    ],
)
def test_members_that_an_export_does_not_write_are_refused(exported, sandbox, extra):
    store, tmp_path = sandbox
    archive = write_archive(archive_path(tmp_path), {**members_of(exported), extra: b"#!/bin/sh\necho owned\n"})
    with pytest.raises(SessionError, match="unexpected member|refusing"):
        store.import_(archive)
    assert store.list() == []


def test_a_member_missing_or_named_twice_is_refused(exported, sandbox):
    store, tmp_path = sandbox
    members = members_of(exported)
    tensor = next(name for name in members if name.endswith(".safetensors"))
    without = {k: v for k, v in members.items() if k != tensor}
    with pytest.raises(SessionError, match="missing"):
        store.import_(write_archive(archive_path(tmp_path, "missing.zip"), without))
    twice = archive_path(tmp_path, "twice.zip")
    write_archive(twice, members)
    with zipfile.ZipFile(twice, "a") as zf, pytest.warns(UserWarning, match="Duplicate name"):
        zf.writestr(tensor, members[tensor])
    with pytest.raises(SessionError, match="twice"):
        store.import_(twice)


def test_a_compressed_bomb_is_refused_before_anything_is_expanded(exported, sandbox):
    store, tmp_path = sandbox
    members = members_of(exported)
    tensor = next(name for name in members if name.endswith(".safetensors"))
    bomb = {**members, tensor: bytes(256 << 20)}
    archive = write_archive(archive_path(tmp_path), bomb, compression=zipfile.ZIP_DEFLATED)
    assert archive.stat().st_size < 2 << 20
    with pytest.raises(SessionError, match="expand"):
        store.import_(archive)
    assert not (store.root.exists() and any(store.root.iterdir()))


def test_a_member_longer_than_its_entry_says_is_refused(exported, sandbox):
    store, tmp_path = sandbox
    members = members_of(exported)
    tensor = next(name for name in members if name.endswith(".safetensors"))
    archive = write_archive(archive_path(tmp_path), members)
    # Rewrite the sizes the archive declares for the tensor to a smaller number (both headers).
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(tensor)
    real = info.file_size.to_bytes(4, "little")
    fake = (info.file_size // 2).to_bytes(4, "little")
    assert data.count(real) >= 2
    archive.write_bytes(bytes(data).replace(real, fake))
    with pytest.raises(SessionError):
        store.import_(archive)
    assert store.list() == []


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda p: p["segments"][0].update(start="0"), "segments"),
        (lambda p: p["segments"][1].update(tokens=-5), "segments"),
        (lambda p: p.update(read_position=10**15), "read_position"),
        (lambda p: p.update(read_position=True), "read_position"),
        (lambda p: p.update(name=["a"]), "name"),
        (lambda p: p.update(name="x" * 100_000), "name"),
        (lambda p: p["threads"][0]["turns"][0].update(answer_token_ids=[1, "2"]), "answer_token_ids"),
        (lambda p: p["threads"][0]["turns"][0].update(seconds=float("nan")), "seconds"),
        (lambda p: p["threads"][0]["turns"][0].update(finish_reason="exploded"), "finish_reason"),
        (lambda p: p["threads"][0]["turns"][0].update(tokens=-1), "tokens"),
        (lambda p: p["threads"][0].update(id="../x"), r"threads\[0\].id"),
        (lambda p: p["threads"].append(dict(p["threads"][0])), "same id"),
        (lambda p: p["files"][0].update(text_sha256="../../etc/passwd"), "text_sha256"),
        (lambda p: p["files"][0].update(end=10**9), "files"),
        (lambda p: p.update(created="yesterday"), "created"),
        (lambda p: p.pop("segments"), "segments"),
        (lambda p: p.update(format_version=3), "format"),
        (lambda p: p.update(model_fingerprint="../x"), "model_fingerprint"),
    ],
)
def test_wrongly_typed_or_out_of_range_fields_are_refused_naming_the_field(exported, sandbox, change, field):
    store, tmp_path = sandbox
    with pytest.raises(SessionError, match=field) as refused:
        store.import_(write_archive(archive_path(tmp_path), with_record(members_of(exported), change)))
    assert "\n" not in str(refused.value) and len(str(refused.value)) < 400
    assert store.list() == []


def test_a_manifest_of_another_model_or_with_a_forged_tensor_is_refused(exported, sandbox):
    store, tmp_path = sandbox
    members = with_record(members_of(exported), lambda p: p.update(model_fingerprint="0" * 32))
    with pytest.raises(SessionError, match="another model"):
        store.import_(write_archive(archive_path(tmp_path, "other.zip"), members))
    members = members_of(exported)
    tensor = next(name for name in members if name.endswith(".safetensors"))
    forged = bytearray(members[tensor])
    forged[-3] ^= 0xFF
    with pytest.raises(SessionError, match="checksum|damaged"):
        store.import_(write_archive(archive_path(tmp_path, "forged.zip"), {**members, tensor: bytes(forged)}))
    assert store.list() == []


def test_export_writes_a_new_file_only_never_through_an_existing_one(exported, chat_checkpoint, tmp_path):
    store = SessionStore(tmp_path / "home")
    session = store.import_(exported)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    target = tmp_path / "out.zip"
    # The name the export once used for its partial file, planted as a link to the victim.
    (tmp_path / f".{target.name}.partial").symlink_to(victim)
    store.export(session.id, target)
    assert victim.read_text() == "keep me"
    assert zipfile.ZipFile(target).testzip() is None
    link = tmp_path / "link.zip"
    link.symlink_to(victim)
    with pytest.raises(SessionError, match="already exists"):
        store.export(session.id, link)
    assert victim.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.glob(".*.partial")) == [f".{target.name}.partial"]  # the planted link


def test_an_export_re_imports_with_the_same_threads_and_snapshots(exported, tmp_path):
    store = SessionStore(tmp_path / "home")
    session = store.import_(exported)
    again = SessionStore(tmp_path / "other").import_(store.export(session.id, tmp_path / "again.zip"))
    assert again.to_json() | {"id": None} == session.to_json() | {"id": None}
    assert again.snapshots().positions == session.snapshots().positions


# -- fuzzing ----------------------------------------------------------------------------------------


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0 and data:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == 1:
        del data[rng.randrange(len(data) + 1) :]
    elif kind == 2:
        at = rng.randrange(len(data) + 1)
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    else:
        at = rng.randrange(len(data) + 1)
        del data[at : at + rng.randint(1, 64)]
    return bytes(data)


# Replaced by 5,000 nested lists once the record is encoded: deeper than a JSON parser recurses.
DEEP = "__nested too deeply__"
ODD_VALUES = [
    None,
    True,
    -1,
    0,
    2**63,
    1.5,
    float("inf"),
    "",
    "0",
    "../../x",
    "/etc/passwd",
    [],
    {},
    [[[]]],
    {"a": 1},
    "\x1b[31m",
    "x" * 70_000,
]


def mutate_value(payload, rng: random.Random):
    """Swap one value somewhere inside `payload` for an odd one (or delete a key, or nest deeply)."""
    paths = []

    def walk(node, path):
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + [k])
        elif isinstance(node, list):
            for i, v in enumerate(node[:4]):
                walk(v, path + [i])

    walk(payload, [])
    path = rng.choice(paths[1:])
    parent = payload
    for key in path[:-1]:
        parent = parent[key]
    roll = rng.random()
    if roll < 0.1 and isinstance(parent, dict):
        del parent[path[-1]]
    elif roll < 0.15:
        parent[path[-1]] = DEEP
    else:
        parent[path[-1]] = rng.choice(ODD_VALUES)
    return payload


def test_fuzzed_archives_end_in_one_line_or_a_valid_session(exported, tmp_path):
    """Random mutations of a valid archive: bytes of the zip, bytes of one member, values of the records
    (checksums recomputed, as an attacker would). Each case: a one-line SessionError or a session that
    lists and reopens; never another exception, never a write outside the data folder."""
    members = members_of(exported)
    original = exported.read_bytes()
    rng = random.Random(15)
    outcomes = {"refused": 0, "imported": 0}
    home = tmp_path / "home"
    store = SessionStore(home)
    for case in range(150):
        kind = case % 3
        if kind == 0:
            data = mutate_bytes(original, rng)
        else:
            changed = dict(members)
            if kind == 1:
                name = rng.choice(sorted(changed))
                changed[name] = mutate_bytes(changed[name], rng)
            else:
                name = rng.choice(["session.json", "snapshots/manifest.json"])
                payload = mutate_value(json.loads(changed[name])["payload"], rng)
                changed[name] = checked_json(payload).replace(json.dumps(DEEP).encode(), b"[" * 5000 + b"]" * 5000)
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w") as zf:
                for member, content in changed.items():
                    zf.writestr(member, content)
            data = buffer.getvalue()
        archive = tmp_path / f"case-{case}.zip"
        archive.write_bytes(data)
        try:
            session = store.import_(archive)
        except SessionError as refused:
            message = str(refused)
            assert "\n" not in message and len(message) < 600, message
            outcomes["refused"] += 1
        else:
            assert session.id in {s.id for s in store.list()}
            session.snapshots().positions
            outcomes["imported"] += 1
        archive.unlink()
        assert {p.name for p in tmp_path.iterdir()} <= {"home"}
        assert not list((home / "sessions").glob(".import-*"))
    assert outcomes["refused"] > 50, outcomes
    assert store.unreadable() == []
    for name in os.listdir(home):
        assert name == "sessions"


# -- threads and the texts read ---------------------------------------------------------------------


def thread_of(members: dict[str, bytes]) -> str:
    (thread,) = {name.split("/")[1] for name in members if name.startswith("threads/")}
    return thread


def test_threads_and_texts_travel_and_resume_without_rebuilding(exported, chat_checkpoint, tmp_path):
    members = members_of(exported)
    thread = thread_of(members)
    assert f"threads/{thread}/manifest.json" in members and any(name.startswith("sources/") for name in members)
    session = SessionStore(tmp_path / "home").import_(exported)
    assert [t.id for t in session.threads] == [thread]
    assert sorted(p.name for p in (session.folder / "sources").iterdir()) == sorted(
        name.split("/")[1] for name in members if name.startswith("sources/")
    )
    notes = []
    assistant = Assistant.load(chat_checkpoint, prefill_chunk=64, checkpoint_interval=100)
    state = assistant.thread_state(session, thread, notice=notes.append)
    assert notes == [] and state.position == session.document_tokens + session.thread(thread).tokens


def test_a_thread_snapshot_the_record_does_not_have_is_refused(exported, sandbox):
    store, tmp_path = sandbox
    members = members_of(exported)
    thread = thread_of(members)
    moved = {name.replace(f"threads/{thread}/", "threads/0123abcd/"): data for name, data in members.items()}
    with pytest.raises(SessionError, match="thread the session does not have"):
        store.import_(write_archive(archive_path(tmp_path), moved))
    assert store.list() == []


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(base=0), "starts at 0"),
        (lambda m: m.pop("base"), "starts at 0"),
        (lambda m: m["checkpoints"][0].update(key="../x"), "key"),
        (lambda m: m["checkpoints"][0].update(position=m["checkpoints"][0]["position"] + 10**6), "past"),
    ],
)
def test_a_thread_manifest_that_is_not_a_thread_of_this_document_is_refused(exported, sandbox, edit, message):
    store, tmp_path = sandbox
    members = members_of(exported)
    name = f"threads/{thread_of(members)}/manifest.json"
    manifest = json.loads(members[name])["payload"]
    edit(manifest)
    with pytest.raises(SessionError, match=message):
        store.import_(write_archive(archive_path(tmp_path), {**members, name: checked_json(manifest)}))
    assert store.list() == []


def test_a_text_that_does_not_match_its_name_is_refused(exported, sandbox):
    store, tmp_path = sandbox
    members = members_of(exported)
    text = next(name for name in members if name.startswith("sources/"))
    with pytest.raises(SessionError, match="does not match its name"):
        store.import_(write_archive(archive_path(tmp_path), {**members, text: b"import os; os.system('x')\n"}))
    assert store.list() == []
