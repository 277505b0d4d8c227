"""The files git tracks in a work tree, read from the repository's index file, without running git.

Why not run `git ls-files`: a repository someone sends you brings its own configuration, and git runs
programs that configuration names. `core.fsmonitor` alone makes reading the index run a command, and
the list of such settings is open-ended and grows with git's versions: hooks (`core.hooksPath`, and
`hook.<name>.command`), filters, diff and merge drivers under names the repository chooses
(`filter.<name>.process`, `diff.<name>.textconv`), pagers, editors, credential helpers, transports that
a partial clone's lazy fetch would start, `include.path` pulling in further files. Overriding the ones
known today on the command line (`git -c ...`) cannot cover names chosen by the repository nor the
settings of a future git, and git's own parsers would still read the attacker's index and
attributes. So git is not run at all: this module reads the few files that say what is tracked, and
the caller lists untracked files with engine/ingest/gitignore.py, the way `git ls-files --cached
--others --exclude-standard` does. Nothing here starts a process, and nothing writes: the repository
is only read (no index refresh, no lock file, no untracked cache).

What is read, and only as data:

- `.git`: a folder, or a file `gitdir: PATH` (linked work trees, submodules); then `commondir`.
- `config`, for one setting only: `extensions.objectFormat` (SHA-1 or SHA-256 object names, which
  sets the size of an index entry). Nothing it names is run or followed, includes included.
- `index`, versions 2 to 4, and the `sharedindex.<hash>` file of a split index. Entries marked
  skip-worktree and sparse-directory entries are left out: their files are not in the work tree.
- `info/exclude`, the repository's own ignore patterns (see `info_exclude`).

Every file is opened only when it is a regular file (a FIFO or a device is never opened), read up
to a size limit, and parsed with bounds checks (engine/ingest/listing.py reads .gitignore files the
same way). An index that does not parse (damaged, or a format this reader does not know) makes
`tracked_paths` return None, and the caller then reads the folder as if it were not a work tree,
as it did when git refused such an index.

Like git (since 2.35.2), a repository whose `.git` or work tree belongs to another user is not
taken as one: someone else's `/tmp/.git` must not decide what is read in `/tmp/project`.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
# A large monorepo's index is tens of MiB (about 100 bytes an entry); anything far beyond is not one.
_MAX_INDEX_BYTES = 256 * 1024 * 1024
# `.git` files, `commondir`, `config` and `info/exclude` are a few lines each.
MAX_SMALL_FILE_BYTES = 16 * 1024 * 1024
_HASH_SIZES = {"sha1": 20, "sha256": 32}
# Index entry layout: ctime, mtime (8 bytes each), dev, ino, mode, uid, gid, size (4 each), then the
# object name and 16 bits of flags.
_STAT_BYTES = 40
_MODE_OFFSET = 24
_FLAG_EXTENDED = 0x4000
_EXTENDED_SKIP_WORKTREE = 0x4000
_MODE_TYPE_MASK = 0o170000
_MODE_DIRECTORY = 0o040000
# Extensions whose signature starts with a capital letter are optional; of the others, a reader
# must understand them all (as git does, which refuses an index with one it does not know).
_SPLIT_INDEX = b"link"
_SPARSE_DIRECTORIES = b"sdir"


class GitFileUnreadable(Exception):
    """A git file that is not what git writes, or not a regular file, or too large: not used."""


@dataclass(frozen=True)
class Repository:
    """A git work tree: its top folder, the git folder holding its index, and the common git folder
    holding its configuration (the same folder except in a linked work tree)."""

    work_tree: Path
    git_dir: Path
    common_dir: Path


def find_repository(folder: Path) -> Repository | None:
    """The work tree `folder` (a real path) lies in, found as git finds it: the nearest `.git` above,
    not across file systems; None when there is none, when `folder` is inside a git folder, or when
    the repository belongs to another user."""
    if ".git" in folder.parts:
        return None
    try:
        device = os.stat(folder).st_dev
    except OSError:
        return None
    for directory in (folder, *folder.parents):
        if directory != folder and _on_other_device(directory, device):
            return None
        dot_git = directory / ".git"
        try:
            is_folder = stat.S_ISDIR(os.stat(dot_git).st_mode)
        except FileNotFoundError:
            continue
        except OSError:
            return None
        if is_folder and not (dot_git / "HEAD").exists():
            # Not a git folder: git too keeps looking further up.
            continue
        try:
            git_dir = dot_git if is_folder else _read_gitfile(dot_git)
            repository = Repository(directory, git_dir, _common_dir(git_dir))
        except GitFileUnreadable:
            return None
        if not (git_dir / "HEAD").exists() or not _owned_by_current_user(directory, dot_git, git_dir):
            return None
        return repository
    return None


def tracked_paths(repository: Repository) -> list[str] | None:
    """The paths the index lists, relative to the work tree, in index order (each once, whatever its
    merge stages), without skip-worktree and sparse-directory entries; [] without an index (a new
    repository); None when the index cannot be read."""
    try:
        hash_size = _hash_size(repository)
        data = read_regular_file(repository.git_dir / "index", _MAX_INDEX_BYTES)
        if data is None:
            return []
        entries = _entries_with_shared_index(repository, _parse_index(data, hash_size), hash_size)
    except GitFileUnreadable:
        return None
    paths = {}
    for entry in entries:
        if entry.skip_worktree or entry.mode & _MODE_TYPE_MASK == _MODE_DIRECTORY or not _is_valid_path(entry.path):
            continue
        paths[os.fsdecode(entry.path)] = None
    return list(paths)


def info_exclude(repository: Repository) -> str | None:
    """The repository's own ignore patterns, `info/exclude`: "" without one, None when unreadable.
    (git also applies the user's global excludes file; that one says what the user commits, not
    what a repository holds, and is not applied here.)"""
    try:
        data = read_regular_file(repository.common_dir / "info" / "exclude", MAX_SMALL_FILE_BYTES)
    except GitFileUnreadable:
        return None
    return (data or b"").decode("utf-8", errors="replace")


def read_regular_file(path: Path, max_bytes: int) -> bytes | None:
    """The bytes of `path`, or None when it does not exist. GitFileUnreadable when it is not a
    regular file, is larger than `max_bytes`, or cannot be read."""
    # stat before open: opening a FIFO waits for a writer and opening some devices acts on them.
    try:
        is_regular = stat.S_ISREG(os.stat(path).st_mode)
        descriptor = os.open(path, _OPEN_FLAGS) if is_regular else None
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as error:
        raise GitFileUnreadable(f"{path}: {error.strerror}") from None
    if descriptor is None:
        raise GitFileUnreadable(f"{path}: not a regular file")
    with os.fdopen(descriptor, "rb") as stream:
        try:
            # The file may have been swapped between stat and open; check what was opened.
            if not stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
                raise GitFileUnreadable(f"{path}: not a regular file")
            data = stream.read(max_bytes + 1)
        except OSError as error:
            raise GitFileUnreadable(f"{path}: {error.strerror}") from None
    if len(data) > max_bytes:
        raise GitFileUnreadable(f"{path}: larger than {max_bytes} bytes")
    return data


# -- where the repository is ---------------------------------------------------------------------


def _on_other_device(directory: Path, device: int) -> bool:
    try:
        return os.stat(directory).st_dev != device
    except OSError:
        return True


def _read_gitfile(dot_git: Path) -> Path:
    """The git folder a `.git` file points to ("gitdir: PATH", relative to the file's folder)."""
    text = _read_text(dot_git)
    if not text.startswith("gitdir:"):
        raise GitFileUnreadable(f"{dot_git}: not a gitfile")
    target = Path(text.removeprefix("gitdir:").strip())
    return target if target.is_absolute() else dot_git.parent / target


def _common_dir(git_dir: Path) -> Path:
    """Where a linked work tree's shared configuration lives (`commondir`, relative to `git_dir`)."""
    text = _read_text(git_dir / "commondir")
    if not text.strip():
        return git_dir
    target = Path(text.strip())
    return target if target.is_absolute() else git_dir / target


def _read_text(path: Path) -> str:
    return (read_regular_file(path, MAX_SMALL_FILE_BYTES) or b"").decode("utf-8", errors="replace")


def _owned_by_current_user(*paths: Path) -> bool:
    """git's default `safe.directory` rule: the work tree, its `.git` and the git folder are the
    current user's."""
    if not hasattr(os, "geteuid"):
        return True
    try:
        return all(os.lstat(path).st_uid == os.geteuid() for path in paths)
    except OSError:
        return False


def _hash_size(repository: Repository) -> int:
    """Bytes of an object name: 20 (SHA-1), or 32 where `extensions.objectFormat` says sha256."""
    name = _config_value(_read_text(repository.common_dir / "config"), "extensions", "objectformat") or "sha1"
    if name.lower() not in _HASH_SIZES:
        raise GitFileUnreadable(f"unknown object format {name!r}")
    return _HASH_SIZES[name.lower()]


_SECTION = re.compile(r'\s*\[\s*([A-Za-z0-9.-]+)(?:\s+"(?:[^"\\]|\\.)*")?\s*\]')
_ENTRY = re.compile(r"\s*([A-Za-z][A-Za-z0-9-]*)\s*(?:=\s*(.*))?$")


def _config_value(text: str, section: str, key: str) -> str | None:
    """The last value of `section.key` (no subsection) in git config text; only plain one-line values
    are understood, which is how git writes the setting read here."""
    value = None
    current = None
    for line in text.splitlines():
        header = _SECTION.match(line)
        if header:
            current = None if '"' in header.group(0) else header.group(1).lower()
            line = line[header.end() :]
        entry = _ENTRY.match(line)
        if current == section and entry and entry.group(1).lower() == key:
            value = re.split(r"\s[#;]", entry.group(2) or "true", maxsplit=1)[0].strip().strip('"')
    return value


# -- the index file --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """What listing needs of an index entry: its path (bytes, as on disk), mode and skip-worktree bit."""

    path: bytes
    mode: int
    skip_worktree: bool


@dataclass(frozen=True)
class _Index:
    """An index file's entries, and for a split index what to merge them with."""

    entries: list[_Entry]
    # Split index: the shared index's hash, then its delete and replace bitmaps (read once the shared
    # index says how many bits they may hold).
    shared_index: bytes | None = None
    bitmaps: bytes = b""


def _parse_index(data: bytes, hash_size: int) -> _Index:
    if len(data) < 12 + hash_size or data[:4] != b"DIRC":
        raise GitFileUnreadable("not an index file")
    version, count = struct.unpack_from(">II", data, 4)
    if version not in (2, 3, 4):
        raise GitFileUnreadable(f"index version {version}")
    end = len(data) - hash_size
    _check_checksum(data, hash_size)
    entries, position = _parse_entries(data, 12, end, version, count, hash_size)
    index = _Index(entries)
    while position < end:
        if position + 8 > end:
            raise GitFileUnreadable("truncated extension")
        signature = data[position : position + 4]
        size = struct.unpack_from(">I", data, position + 4)[0]
        start, position = position + 8, position + 8 + size
        if position > end:
            raise GitFileUnreadable("truncated extension")
        if signature == _SPLIT_INDEX:
            index = _parse_split_index(data[start:position], hash_size, entries)
        elif not (b"A" <= signature[:1] <= b"Z") and signature != _SPARSE_DIRECTORIES:
            raise GitFileUnreadable(f"required index extension {signature!r}")
    return index


def _check_checksum(data: bytes, hash_size: int) -> None:
    """The trailing hash covers the rest; git writes zeros there with index.skipHash."""
    trailer = data[-hash_size:]
    if trailer == bytes(hash_size):
        return
    algorithm = hashlib.sha1 if hash_size == 20 else hashlib.sha256
    if algorithm(memoryview(data)[:-hash_size]).digest() != trailer:
        raise GitFileUnreadable("index checksum mismatch")


def _parse_entries(
    data: bytes, position: int, end: int, version: int, count: int, hash_size: int
) -> tuple[list[_Entry], int]:
    """`count` entries from `position`; version 4 prefix-compresses paths, earlier versions pad
    each entry with 1 to 8 NUL bytes to a multiple of 8."""
    entries = []
    previous = b""
    flags_at = _STAT_BYTES + hash_size
    for _ in range(count):
        if position + flags_at + 2 > end:
            raise GitFileUnreadable("truncated index entry")
        mode = struct.unpack_from(">I", data, position + _MODE_OFFSET)[0]
        flags = struct.unpack_from(">H", data, position + flags_at)[0]
        name_at = position + flags_at + 2
        extended = 0
        if flags & _FLAG_EXTENDED:
            if version < 3 or name_at + 2 > end:
                raise GitFileUnreadable("bad extended flags")
            extended = struct.unpack_from(">H", data, name_at)[0]
            name_at += 2
        kept = 0
        if version == 4:
            strip, name_at = _varint(data, name_at, end)
            kept = len(previous) - strip
            if kept < 0:
                raise GitFileUnreadable("bad path compression")
        name_end = data.find(b"\0", name_at, end)
        if name_end < 0:
            raise GitFileUnreadable("unterminated path")
        path = previous[:kept] + data[name_at:name_end]
        if version == 4:
            position = name_end + 1
        else:
            position += (name_end - position + 8) & ~7
        previous = path
        entries.append(_Entry(path, mode, bool(extended & _EXTENDED_SKIP_WORKTREE)))
    if position > end:
        raise GitFileUnreadable("truncated index entry")
    return entries, position


def _varint(data: bytes, position: int, end: int) -> tuple[int, int]:
    """git's offset varint (as in OFS_DELTA): 7 bits a byte, high bit = more, +1 per continuation."""
    value = -1
    while True:
        if position >= end or value > 1 << 40:
            raise GitFileUnreadable("bad varint")
        byte = data[position]
        position += 1
        value = ((value + 1) << 7) | (byte & 0x7F)
        if not byte & 0x80:
            return value, position


# -- split index -----------------------------------------------------------------------------------


def _parse_split_index(extension: bytes, hash_size: int, entries: list[_Entry]) -> _Index:
    shared = extension[:hash_size]
    if len(shared) != hash_size:
        raise GitFileUnreadable("truncated split-index extension")
    if shared == bytes(hash_size):
        return _Index(entries)
    return _Index(entries, shared, extension[hash_size:])


def _entries_with_shared_index(repository: Repository, index: _Index, hash_size: int) -> list[_Entry]:
    """A split index's entries merged into its shared index's: shared entries not deleted (those
    replaced take the new entry, whose path may be left empty), then the entries added."""
    if index.shared_index is None:
        return index.entries
    data = read_regular_file(repository.git_dir / f"sharedindex.{index.shared_index.hex()}", _MAX_INDEX_BYTES)
    if data is None:
        raise GitFileUnreadable("shared index missing")
    shared = _parse_index(data, hash_size)
    if shared.shared_index is not None:
        raise GitFileUnreadable("a shared index that is split itself")
    deleted, position = _ewah_bits(index.bitmaps, 0, len(shared.entries))
    replaced, position = _ewah_bits(index.bitmaps, position, len(shared.entries))
    if position != len(index.bitmaps) or len(replaced) > len(index.entries):
        raise GitFileUnreadable("bad split-index extension")
    merged = list(shared.entries)
    for bit, entry in zip(replaced, index.entries, strict=False):
        merged[bit] = _Entry(entry.path or merged[bit].path, entry.mode, entry.skip_worktree)
    gone = set(deleted)
    kept = [entry for bit, entry in enumerate(merged) if bit not in gone]
    return kept + index.entries[len(replaced) :]


def _ewah_bits(data: bytes, position: int, limit: int) -> tuple[list[int], int]:
    """The set bits of a serialized EWAH bitmap at `position` (bit count, word count, 64-bit words,
    last-marker position; all big-endian), and the position after it.

    Each marker word holds a run bit (bit 0), a run length in words (bits 1-32) and a count of
    literal words that follow it (bits 33-63); literal words list bits from the lowest. A bitmap
    of more than `limit` bits is refused, so a hostile run length cannot make a huge list.
    """
    if position + 8 > len(data):
        raise GitFileUnreadable("truncated bitmap")
    bit_count, word_count = struct.unpack_from(">II", data, position)
    words_at = position + 8
    after = words_at + 8 * word_count + 4
    if after > len(data) or bit_count > limit:
        raise GitFileUnreadable("bad bitmap")
    words = struct.unpack_from(f">{word_count}Q", data, words_at)
    bits: list[int] = []
    at = 0
    index = 0
    while index < word_count:
        marker = words[index]
        run_words, literal_words = (marker >> 1) & 0xFFFFFFFF, marker >> 33
        if marker & 1:
            bits.extend(range(at, min(at + 64 * run_words, bit_count)))
        at += 64 * run_words
        for word in words[index + 1 : index + 1 + literal_words]:
            bits.extend(at + bit for bit in range(64) if word >> bit & 1)
            at += 64
        index += 1 + literal_words
    if bits and bits[-1] >= bit_count:
        raise GitFileUnreadable("bitmap bit past its end")
    return bits, after


def _is_valid_path(path: bytes) -> bool:
    """A path git would write: relative, no empty, ".", ".." or ".git" part (such an entry in a
    crafted index must not name a file outside the work tree)."""
    return bool(path) and all(
        part and part not in (b".", b"..") and part.lower() != b".git" for part in path.split(b"/")
    )
