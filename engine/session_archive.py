"""Sessions as one .zip file: export, and an import that trusts nothing in the archive.

An archive holds `session.json`, `snapshots/manifest.json` and the tensor files the manifest names,
for each thread with a snapshot `threads/<id>/manifest.json` and its tensor files, and the texts read,
`sources/<sha256>.txt`; all stored uncompressed. It may come from anyone, and its checksums are plain
SHA-256 that anyone can recompute, so they only catch accidents. Import therefore checks the whole
archive before anything becomes a session:

- members: exactly the records and the files the manifests name, each once, plain names only; thread
  folders only of threads the record has, texts only those the record's files name;
- sizes: each record at most MAX_RECORD_BYTES, the whole at most twice the archive plus
  MAX_RECORD_BYTES (a legitimate archive is stored, so it barely expands) and within the free disk;
- records: every field typed and bounded (engine/session_record.py), each manifest's identity that
  of the session, no checkpoint past the document's end (a thread's: none before it, its cache
  starting where the document ends, engine/snapshot.py);
- tensors: each file read back as safetensors with its identity and data checksum checked;
- texts: each one's bytes hash to its name.

Everything is written into a staging folder inside the sessions folder, by name, never by a path the
archive gives, and moved into place under an id kimi-desk chooses (the archived one when it is ours
and free). On any failure the staging folder is removed and nothing else was touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path

from kimi_desk.engine.errors import writing
from kimi_desk.engine.file_lock import file_lock
from kimi_desk.engine.session_record import (
    LOCKS_FOLDER,
    SESSION_FILE,
    THREADS,
    THREADS_LOCK,
    Session,
    SessionError,
    is_session_id,
    is_thread_id,
)
from kimi_desk.engine.snapshot import MANIFEST, SnapshotError, SnapshotStore, parse_checked_json, read_tensors
from kimi_desk.engine.sources import MAX_SOURCE_BYTES, SOURCE_FILE, SOURCES

SNAPSHOTS = "snapshots"
MAX_RECORD_BYTES = 64 << 20
MAX_MEMBERS = 1 << 16
# Tensor files as the snapshot store names them.
_TENSOR_FILE = re.compile(r"(kda|mla)-[0-9-]+\.safetensors")
_COPY_BLOCK = 1 << 20


def export_session(session: Session, archive: Path) -> Path:
    """Write `session` as one .zip at `archive`, which must not exist. Written to a new temporary file
    beside it (never through an existing file or link) and moved into place only when complete; on a
    failure (a full disk) the temporary file is removed and the error is one line."""
    archive = Path(archive).expanduser()
    if archive.exists() or archive.is_symlink():
        raise SessionError(f"{archive} already exists; choose another name")
    if not archive.parent.is_dir():
        raise SessionError(f"{archive.parent}: no such folder")
    snapshots = session.snapshots()
    tensors = [(snapshots.folder / name, f"{SNAPSHOTS}/{name}") for name in snapshots.files]
    texts = sorted({f["text_sha256"] for f in session.files if "text_sha256" in f})
    with writing(archive):
        descriptor, partial = tempfile.mkstemp(dir=archive.parent, prefix=f".{archive.name}.", suffix=".partial")
        try:
            with os.fdopen(descriptor, "wb") as fh:
                with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                    zf.write(session.folder / SESSION_FILE, SESSION_FILE)
                    zf.writestr(f"{SNAPSHOTS}/{MANIFEST}", snapshots.manifest_bytes())
                    for path, name in tensors:
                        zf.write(path, name)
                    _export_threads(session, zf)
                    for digest in texts:
                        path = session.folder / SOURCES / f"{digest}.txt"
                        if path.is_file():  # a session read before texts were kept has none
                            zf.write(path, f"{SOURCES}/{digest}.txt")
                fh.flush()
                os.fsync(fh.fileno())
            _move_without_replacing(Path(partial), archive)
        finally:
            Path(partial).unlink(missing_ok=True)
    return archive


def _export_threads(session: Session, zf: zipfile.ZipFile) -> None:
    """Each thread's snapshot that opens as it should (one left by a document read again, or damaged,
    is left out: the thread is rebuilt from its transcript wherever it is opened)."""
    with file_lock(session.folder.parent / LOCKS_FOLDER / THREADS_LOCK.format(session.id)):
        for thread in session.threads:
            folder = session.folder / THREADS / thread.id
            if not (folder / MANIFEST).is_file():
                continue
            try:
                store = SnapshotStore(folder, session.identity, base=session.document_tokens)
            except SnapshotError:
                continue
            zf.writestr(f"{THREADS}/{thread.id}/{MANIFEST}", store.manifest_bytes())
            for name in store.files:
                zf.write(folder / name, f"{THREADS}/{thread.id}/{name}")


def _move_without_replacing(source: Path, target: Path) -> None:
    """Give `source` the name `target` unless `target` appeared meanwhile (a hard link fails then)."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise SessionError(f"{target} already exists; choose another name") from None
    except OSError:
        # A file system without hard links (FAT on a USB stick): the check above is then the guard.
        if target.exists() or target.is_symlink():
            raise SessionError(f"{target} already exists; choose another name") from None
        os.replace(source, target)


def import_session(archive: Path, root: Path) -> str:
    """Check `archive` completely and add it under `root` (the sessions folder); returns its new id."""
    archive = Path(archive).expanduser()
    try:
        zf = zipfile.ZipFile(archive)
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise SessionError(f"{archive}: not a kimi-desk session archive ({_reason(exc)})") from None
    with zf:
        members = _check_members(archive, zf)
        session_raw = _read_record(archive, zf, members[SESSION_FILE])
        stores = {}
        for folder in sorted({name.rpartition("/")[0] for name in members if name.endswith("/" + MANIFEST)}):
            manifest_raw = _read_record(archive, zf, members[f"{folder}/{MANIFEST}"])
            stores[folder] = (manifest_raw, _check_tensor_members(archive, folder, manifest_raw, members))
        named = {f"{folder}/{name}" for folder, (_, names) in stores.items() for name in names}
        extra = sorted(
            name
            for name in members
            if name != SESSION_FILE
            and not name.endswith("/" + MANIFEST)
            and name not in named
            and not name.startswith(f"{SOURCES}/")
        )
        if extra:
            raise SessionError(f"{archive}: unexpected member {_shown(extra[0])}; refusing to import")
        with writing(root):
            root.mkdir(parents=True, exist_ok=True)
            needed = sum(info.file_size for info in members.values())
            free = shutil.disk_usage(root).free
            if needed > free:
                raise SessionError(f"{archive}: importing needs {needed:,} bytes, {root} has {free:,} free")
            staging = root / f".import-{secrets.token_hex(4)}"
            staging.mkdir()
        try:
            with writing(staging):
                session = _stage(archive, zf, members, session_raw, stores, staging)
                return _move_into_place(staging, session, root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _check_members(archive: Path, zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """Member name -> entry, for archives that hold only what an export writes."""
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise SessionError(f"{archive}: {len(infos):,} members, more than a session has; refusing to import")
    members: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = info.filename
        if info.is_dir() and _is_folder(name.rstrip("/")):
            continue
        folder, _, base = name.rpartition("/")
        plain = (
            name == SESSION_FILE
            or (_is_snapshot_folder(folder) and (base == MANIFEST or _TENSOR_FILE.fullmatch(base)))
            or (folder == SOURCES and SOURCE_FILE.fullmatch(base))
        )
        if not plain:
            raise SessionError(f"{archive}: unexpected member {_shown(name)}; refusing to import")
        if name in members:
            raise SessionError(f"{archive}: member {_shown(name)} appears twice; refusing to import")
        if info.flag_bits & 0x1:
            raise SessionError(f"{archive}: member {_shown(name)} is encrypted; refusing to import")
        if stat.S_IFMT(info.external_attr >> 16) not in (0, stat.S_IFREG):
            raise SessionError(f"{archive}: member {_shown(name)} is not a plain file; refusing to import")
        members[name] = info
    for required in (SESSION_FILE, f"{SNAPSHOTS}/{MANIFEST}"):
        if required not in members:
            raise SessionError(f"{archive}: no {required} inside; not a kimi-desk session archive")
    expanded = sum(info.file_size for info in members.values())
    allowed = 2 * archive.stat().st_size + MAX_RECORD_BYTES
    if expanded > allowed:
        raise SessionError(
            f"{archive}: its members expand to {expanded:,} bytes, more than an exported session "
            f"of its size can ({allowed:,}); refusing to import"
        )
    return members


def _read_record(archive: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> object:
    """A checked-JSON member's payload (the checksum wrapper as write_checked_json writes it)."""
    if info.file_size > MAX_RECORD_BYTES:
        raise SessionError(
            f"{archive}: {info.filename} is {info.file_size:,} bytes, more than a session record "
            f"can be ({MAX_RECORD_BYTES:,})"
        )
    data = _read_member(archive, zf, info, MAX_RECORD_BYTES)
    try:
        return parse_checked_json(data, f"{archive}: {info.filename}")
    except SnapshotError as exc:
        raise SessionError(str(exc)) from None


def _read_member(archive: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    try:
        with zf.open(info) as member:
            data = member.read(limit + 1)
    except (OSError, zipfile.BadZipFile, ValueError, EOFError, NotImplementedError, RuntimeError) as exc:
        raise SessionError(f"{archive}: cannot read {_shown(info.filename)} ({_reason(exc)})") from None
    if len(data) > limit:
        raise SessionError(f"{archive}: {_shown(info.filename)} is larger than its entry says; refusing to import")
    return data


def _is_snapshot_folder(folder: str) -> bool:
    """`snapshots` or `threads/<thread id>`."""
    parent, _, name = folder.partition("/")
    return folder == SNAPSHOTS or (parent == THREADS and is_thread_id(name))


def _is_folder(name: str) -> bool:
    """A folder entry an archiver may add: one the archive's files sit in."""
    return name in (SNAPSHOTS, THREADS, SOURCES) or _is_snapshot_folder(name)


def _check_tensor_members(archive: Path, folder: str, manifest: object, members: dict) -> list[str]:
    """The tensor files `folder`'s manifest names, which must be exactly the folder's other members."""
    try:
        named = [entry["file"] for kind in ("checkpoints", "segments") for entry in manifest[kind]]
    except (KeyError, TypeError, IndexError):
        raise SessionError(f"{archive}: {folder}/{MANIFEST} is damaged") from None
    if not all(isinstance(name, str) and _TENSOR_FILE.fullmatch(name) for name in named) or len(set(named)) != len(
        named
    ):
        raise SessionError(f"{archive}: {folder}/{MANIFEST} names files a snapshot cannot have")
    present = {name.rpartition("/")[2] for name in members if name.rpartition("/")[0] == folder} - {MANIFEST}
    if set(named) - present:
        raise SessionError(f"{archive}: {sorted(set(named) - present)[0]} is named by the manifest but missing")
    if present - set(named):
        raise SessionError(
            f"{archive}: unexpected member {folder}/{_shown(sorted(present - set(named))[0])}; refusing to import"
        )
    return named


def _stage(archive: Path, zf, members, session_raw, stores: dict, staging: Path) -> Session:
    """Write and check everything in `staging`: the records, then each tensor file and text, read back."""
    if isinstance(session_raw, dict) and not is_session_id(session_raw.get("id")):
        session_raw = {**session_raw, "id": "unset"}  # the id is ours: a new one is chosen
    session = Session.from_json(staging, session_raw, origin=str(archive))
    if SNAPSHOTS not in stores:
        raise SessionError(f"{archive}: no {SNAPSHOTS}/{MANIFEST} inside; not a kimi-desk session archive")
    threads = {t.id: t for t in session.threads}
    for folder in stores:
        if folder != SNAPSHOTS and folder.rpartition("/")[2] not in threads:
            raise SessionError(f"{archive}: {_shown(folder)} is the snapshot of a thread the session does not have")
    (staging / THREADS).mkdir()
    for folder, (manifest_raw, tensor_names) in stores.items():
        thread = threads.get(folder.rpartition("/")[2]) if folder != SNAPSHOTS else None
        (staging / folder).mkdir()
        manifest = members[f"{folder}/{MANIFEST}"]
        (staging / folder / MANIFEST).write_bytes(_read_member(archive, zf, manifest, manifest.file_size))
        try:
            store = SnapshotStore(
                staging / folder, session.identity, base=session.document_tokens if thread is not None else 0
            )
        except SnapshotError as exc:
            # Named as the archive names it, not by the staging folder's path.
            reason = str(exc).replace(str(staging / folder / MANIFEST), f"{folder}/{MANIFEST}")
            raise SessionError(f"{archive}: {_reason(SnapshotError(reason))}") from None
        end = session.document_tokens
        if thread is not None and all(turn.tokens for turn in thread.turns):
            end += thread.tokens
        if any(p > end for p in store.positions):
            raise SessionError(
                f"{archive}: a checkpoint in {folder} lies past the end of "
                f"{'the document' if thread is None else 'its thread'}"
            )
        digests = {
            entry["file"]: entry["sha256"] for kind in ("checkpoints", "segments") for entry in manifest_raw[kind]
        }
        for name in tensor_names:
            target = staging / folder / name
            _copy_member(archive, zf, members[f"{folder}/{name}"], target)
            try:
                read_tensors(target, session.identity, digests[name])
            except SnapshotError as exc:
                raise SessionError(f"{archive}: {_reason(exc)}") from None
    _stage_texts(archive, zf, members, session, staging)
    return session


def _stage_texts(archive: Path, zf, members, session: Session, staging: Path) -> None:
    """The texts read: only those the record's files name, each hashing to its name."""
    named = {f["text_sha256"] for f in session.files if "text_sha256" in f}
    texts = sorted(name for name in members if name.startswith(f"{SOURCES}/"))
    (staging / SOURCES).mkdir()
    for name in texts:
        digest = name.rpartition("/")[2][:-4]
        if digest not in named:
            raise SessionError(f"{archive}: {_shown(name)} is a text no file of the session names; refusing to import")
        info = members[name]
        if info.file_size > MAX_SOURCE_BYTES:
            raise SessionError(f"{archive}: {_shown(name)} is larger than any text kimi-desk reads")
        digester = hashlib.sha256()
        _copy_member(archive, zf, info, staging / name, digester)
        if digester.hexdigest() != digest:
            raise SessionError(f"{archive}: {_shown(name)} is damaged (its text does not match its name)")


def _copy_member(archive: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, digester=None) -> None:
    """Stream one member to `target`, never more bytes than its entry declares (and into `digester`)."""
    written = 0
    try:
        with zf.open(info) as member, open(target, "xb") as out:
            while block := member.read(_COPY_BLOCK):
                written += len(block)
                if written > info.file_size:
                    raise SessionError(
                        f"{archive}: {_shown(info.filename)} is larger than its entry says; refusing to import"
                    )
                out.write(block)
                if digester is not None:
                    digester.update(block)
    except (zipfile.BadZipFile, ValueError, EOFError, NotImplementedError, RuntimeError) as exc:
        if isinstance(exc, SessionError):
            raise
        raise SessionError(f"{archive}: cannot read {_shown(info.filename)} ({_reason(exc)})") from None


def _move_into_place(staging: Path, session: Session, root: Path) -> str:
    """Move the checked session to its own id: the archived one when it is ours and free, else a new one.
    The id is reserved by creating its folder (atomic), and the staged folder renamed over it."""
    candidate = session.id if is_session_id(session.id) else None
    while True:
        session_id = candidate or secrets.token_hex(4)
        candidate = None
        try:
            (root / session_id).mkdir()
            break
        except FileExistsError:
            continue
    try:
        raw = session.to_json()
        raw["id"] = session_id
        Session.from_json(staging, raw).write_new()
        os.replace(staging, root / session_id)
    except BaseException:
        shutil.rmtree(root / session_id, ignore_errors=True)
        raise
    return session_id


def _shown(name: str) -> str:
    """A member name as an error shows it: quoted, control characters escaped, bounded."""
    text = json.dumps(name)
    return text if len(text) <= 80 else text[:77] + '..."'


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."
