"""Sessions as one .zip file: export, and an import that trusts nothing in the archive.

An archive holds `session.json`, `snapshots/manifest.json` and the tensor files the manifest names,
stored uncompressed. It may come from anyone, and its checksums are plain SHA-256 that anyone can
recompute, so they only catch accidents. Import therefore checks the whole archive before anything
becomes a session:

- members: exactly the two records and the files the manifest names, each once, plain names only;
- sizes: each record at most MAX_RECORD_BYTES, the whole at most twice the archive plus
  MAX_RECORD_BYTES (a legitimate archive is stored, so it barely expands) and within the free disk;
- records: every field typed and bounded (engine/session_record.py), the manifest's identity that
  of the session, no checkpoint past the document's end;
- tensors: each file read back as safetensors with its identity and data checksum checked.

Everything is written into a staging folder inside the sessions folder, by name, never by a path the
archive gives, and moved into place under an id kimi-desk chooses (the archived one when it is ours
and free). On any failure the staging folder is removed and nothing else was touched.
"""

from __future__ import annotations

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
from kimi_desk.engine.session_record import SESSION_FILE, Session, SessionError, is_session_id
from kimi_desk.engine.snapshot import MANIFEST, SnapshotError, SnapshotStore, parse_checked_json, read_tensors

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
    with writing(archive):
        descriptor, partial = tempfile.mkstemp(dir=archive.parent, prefix=f".{archive.name}.", suffix=".partial")
        try:
            with os.fdopen(descriptor, "wb") as fh:
                with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                    zf.write(session.folder / SESSION_FILE, SESSION_FILE)
                    zf.writestr(f"{SNAPSHOTS}/{MANIFEST}", snapshots.manifest_bytes())
                    for path, name in tensors:
                        zf.write(path, name)
                fh.flush()
                os.fsync(fh.fileno())
            _move_without_replacing(Path(partial), archive)
        finally:
            Path(partial).unlink(missing_ok=True)
    return archive


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
        manifest_raw = _read_record(archive, zf, members[f"{SNAPSHOTS}/{MANIFEST}"])
        tensor_names = _check_tensor_members(archive, manifest_raw, members)
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
                session = _stage(archive, zf, members, session_raw, manifest_raw, tensor_names, staging)
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
        if name == f"{SNAPSHOTS}/" and info.is_dir():
            continue
        folder, _, base = name.rpartition("/")
        plain = name == SESSION_FILE or (folder == SNAPSHOTS and (base == MANIFEST or _TENSOR_FILE.fullmatch(base)))
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
        raise SessionError(f"{archive}: its members expand to {expanded:,} bytes, more than an exported session "
                           f"of its size can ({allowed:,}); refusing to import")
    return members


def _read_record(archive: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> object:
    """A checked-JSON member's payload (the checksum wrapper as write_checked_json writes it)."""
    if info.file_size > MAX_RECORD_BYTES:
        raise SessionError(f"{archive}: {info.filename} is {info.file_size:,} bytes, more than a session record "
                           f"can be ({MAX_RECORD_BYTES:,})")
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


def _check_tensor_members(archive: Path, manifest: object, members: dict) -> list[str]:
    """The tensor files the manifest names, which must be exactly the archive's other members."""
    try:
        named = [entry["file"] for kind in ("checkpoints", "segments") for entry in manifest[kind]]
    except (KeyError, TypeError, IndexError):
        raise SessionError(f"{archive}: {SNAPSHOTS}/{MANIFEST} is damaged") from None
    if not all(isinstance(name, str) and _TENSOR_FILE.fullmatch(name) for name in named) or len(set(named)) != len(named):
        raise SessionError(f"{archive}: {SNAPSHOTS}/{MANIFEST} names files a snapshot cannot have")
    present = {name.split("/", 1)[1] for name in members if name.startswith(f"{SNAPSHOTS}/")} - {MANIFEST}
    if set(named) - present:
        raise SessionError(f"{archive}: {sorted(set(named) - present)[0]} is named by the manifest but missing")
    if present - set(named):
        raise SessionError(f"{archive}: unexpected member {SNAPSHOTS}/{_shown(sorted(present - set(named))[0])}; "
                           "refusing to import")
    return named


def _stage(archive: Path, zf, members, session_raw, manifest_raw, tensor_names, staging: Path) -> Session:
    """Write and check everything in `staging`: the records, then each tensor file, read back."""
    if isinstance(session_raw, dict) and not is_session_id(session_raw.get("id")):
        session_raw = {**session_raw, "id": "unset"}  # the id is ours: a new one is chosen
    session = Session.from_json(staging, session_raw, origin=str(archive))
    (staging / SNAPSHOTS).mkdir()
    manifest = members[f"{SNAPSHOTS}/{MANIFEST}"]
    (staging / SNAPSHOTS / MANIFEST).write_bytes(_read_member(archive, zf, manifest, manifest.file_size))
    try:
        snapshots = SnapshotStore(staging / SNAPSHOTS, session.identity)
    except SnapshotError as exc:
        raise SessionError(f"{archive}: {_reason(exc)}") from None
    if any(p > session.document_tokens for p in snapshots.positions):
        raise SessionError(f"{archive}: a checkpoint lies past the end of the document")
    digests = {entry["file"]: entry["sha256"] for kind in ("checkpoints", "segments") for entry in manifest_raw[kind]}
    for name in tensor_names:
        info = members[f"{SNAPSHOTS}/{name}"]
        target = staging / SNAPSHOTS / name
        _copy_member(archive, zf, info, target)
        try:
            read_tensors(target, session.identity, digests[name])
        except SnapshotError as exc:
            raise SessionError(f"{archive}: {_reason(exc)}") from None
    return session


def _copy_member(archive: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path) -> None:
    """Stream one member to `target`, never more bytes than its entry declares."""
    written = 0
    try:
        with zf.open(info) as member, open(target, "xb") as out:
            while block := member.read(_COPY_BLOCK):
                written += len(block)
                if written > info.file_size:
                    raise SessionError(f"{archive}: {_shown(info.filename)} is larger than its entry says; "
                                       "refusing to import")
                out.write(block)
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
