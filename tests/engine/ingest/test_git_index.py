"""Reading git's index without git: every format git writes gives what `git ls-files` gives, and an
index crafted to mislead or exhaust the reader is refused, never trusted and never a crash."""

from __future__ import annotations

import hashlib
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from ingest_documents import git, git_environment, write_files

from kimi_desk.engine.ingest.git_index import Repository, find_repository, tracked_paths

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")

FILES = {f"pkg{i % 4}/module_{i:02d}.py": f"VALUE = {i}\n" for i in range(40)} | {"README.md": "# r\n"}


def committed_repository(root: Path, *init_options: str) -> Path:
    write_files(root, FILES)
    git(root, "init", "--quiet", *init_options)
    git(root, "add", ".")
    git(root, "commit", "--quiet", "-m", "initial")
    return root


def git_tracked(folder: Path) -> list[str]:
    """What git's index lists, without entries marked skip-worktree ("S" in `ls-files -t`)."""
    lines = git(folder, "ls-files", "--cached", "-t", "-z").split("\0")
    return sorted(dict.fromkeys(line[2:] for line in lines if line and line[0] != "S"))


def ours(folder: Path) -> list[str]:
    repository = find_repository(folder.resolve())
    assert repository is not None
    paths = tracked_paths(repository)
    assert paths is not None
    return sorted(paths)


@pytest.mark.parametrize("version", [2, 3, 4])
def test_index_versions(tmp_path, version):
    root = committed_repository(tmp_path)
    git(root, "update-index", "--index-version", str(version))
    # An intent-to-add entry carries the extended flags of version 3 and later.
    write_files(root, {"intended.py": "later\n"})
    git(root, "add", "--intent-to-add", "intended.py")
    assert ours(root) == git_tracked(root)
    assert "intended.py" in ours(root)


def test_split_index_with_deleted_replaced_and_added_entries(tmp_path):
    root = committed_repository(tmp_path)
    git(root, "update-index", "--split-index")
    write_files(root, {"pkg1/module_01.py": "changed\n", "pkg2/module_02.py": "changed\n", "added.py": "new\n"})
    git(root, "add", "pkg1/module_01.py", "pkg2/module_02.py", "added.py")
    git(root, "rm", "--quiet", "--cached", "pkg3/module_03.py", "README.md")
    index = (root / ".git" / "index").read_bytes()
    assert b"link" in index and list((root / ".git").glob("sharedindex.*"))
    assert ours(root) == git_tracked(root)
    assert "added.py" in ours(root) and "README.md" not in ours(root)


def test_sha256_repository(tmp_path):
    root = committed_repository(tmp_path, "--object-format=sha256")
    assert ours(root) == git_tracked(root) == sorted(FILES)


def test_conflicted_path_is_listed_once(tmp_path):
    root = committed_repository(tmp_path)
    git(root, "checkout", "--quiet", "-b", "other")
    write_files(root, {"README.md": "# other\n"})
    git(root, "commit", "--quiet", "-am", "other")
    git(root, "checkout", "--quiet", "-")
    write_files(root, {"README.md": "# main\n"})
    git(root, "commit", "--quiet", "-am", "main")
    merge = subprocess.run(["git", "merge", "other"], cwd=root, env=git_environment(), capture_output=True, check=False)
    assert merge.returncode != 0
    assert "README.md" in git(root, "ls-files", "--unmerged")
    assert ours(root) == git_tracked(root)


def test_skip_worktree_entries_and_a_sparse_index_are_left_out(tmp_path):
    root = committed_repository(tmp_path)
    git(root, "sparse-checkout", "set", "--cone", "--sparse-index", "pkg1")
    assert b"sdir" in (root / ".git" / "index").read_bytes()
    assert ours(root) == git_tracked(root)
    assert ours(root) == ["README.md"] + sorted(path for path in FILES if path.startswith("pkg1/"))


def test_linked_work_tree_and_subfolder(tmp_path):
    root = committed_repository(tmp_path / "main")
    git(root, "worktree", "add", "--quiet", str(tmp_path / "linked"))
    linked = tmp_path / "linked"
    write_files(linked, {"only-here.py": "x\n"})
    git(linked, "add", "only-here.py")
    repository = find_repository((linked / "pkg1").resolve())
    assert repository.work_tree == linked.resolve()
    assert repository.git_dir.resolve() == (root / ".git" / "worktrees" / "linked").resolve()
    assert repository.common_dir.resolve() == (root / ".git").resolve()
    assert ours(linked) == git_tracked(linked)


def test_no_index_yet_and_no_repository(tmp_path):
    write_files(tmp_path, {"repo/a.py": "a\n", "plain/b.py": "b\n"})
    git(tmp_path / "repo", "init", "--quiet")
    assert tracked_paths(find_repository((tmp_path / "repo").resolve())) == []
    assert find_repository((tmp_path / "plain").resolve()) is None
    assert find_repository((tmp_path / "repo" / ".git").resolve()) is None


# -- crafted indexes -------------------------------------------------------------------------------


def index_bytes(paths: list[bytes], extensions: bytes = b"", trailer: bytes | None = None) -> bytes:
    """A version-2 index of regular files (zero stat data and object names), as git lays it out."""
    body = b"DIRC" + struct.pack(">II", 2, len(paths))
    for path in paths:
        flags = struct.pack(">H", min(len(path), 0xFFF))
        entry = bytes(24) + struct.pack(">I", 0o100644) + bytes(12) + bytes(20) + flags + path
        body += entry + bytes(8 - len(entry) % 8)
    body += extensions
    return body + (hashlib.sha1(body).digest() if trailer is None else trailer)


def repository_with_index(root: Path, data: bytes) -> Repository:
    root.mkdir(parents=True, exist_ok=True)
    git(root, "init", "--quiet")
    (root / ".git" / "index").write_bytes(data)
    return find_repository(root.resolve())


def test_crafted_paths_that_leave_the_work_tree_are_dropped(tmp_path):
    paths = [b"../outside.txt", b".git/config", b"a/../../b", b"./c", b"/absolute", b"d//e", b"fine.txt", b"sub/.GIT/x"]
    repository = repository_with_index(tmp_path, index_bytes(sorted(paths)))
    assert tracked_paths(repository) == ["fine.txt"]


def test_a_zero_trailer_is_accepted_and_a_wrong_one_refused(tmp_path):
    # git writes zeros instead of the checksum with index.skipHash (git 2.40 and later).
    assert tracked_paths(repository_with_index(tmp_path / "a", index_bytes([b"x.py"], trailer=bytes(20)))) == ["x.py"]
    assert tracked_paths(repository_with_index(tmp_path / "b", index_bytes([b"x.py"], trailer=b"\1" * 20))) is None


def test_an_unknown_required_extension_is_refused_an_optional_one_skipped(tmp_path):
    optional = b"ZZZZ" + struct.pack(">I", 3) + b"abc"
    required = b"zzzz" + struct.pack(">I", 3) + b"abc"
    assert tracked_paths(repository_with_index(tmp_path / "a", index_bytes([b"x.py"], optional))) == ["x.py"]
    assert tracked_paths(repository_with_index(tmp_path / "b", index_bytes([b"x.py"], required))) is None


def test_a_split_index_bitmap_claiming_billions_of_bits_is_refused(tmp_path):
    repository = repository_with_index(tmp_path, b"")
    shared = index_bytes([b"a.py", b"b.py"])
    shared_hash = hashlib.sha1(shared[:-20]).digest()
    (tmp_path / ".git" / f"sharedindex.{shared_hash.hex()}").write_bytes(shared)
    # One marker word: a run of 2**32 - 1 words of ones, in a bitmap that says it has 2**32 - 1 bits.
    huge = struct.pack(">IIQI", 0xFFFFFFFF, 1, (0xFFFFFFFF << 1) | 1, 0)
    empty = struct.pack(">III", 0, 0, 0)
    link = shared_hash + huge + empty
    (tmp_path / ".git" / "index").write_bytes(index_bytes([], b"link" + struct.pack(">I", len(link)) + link))
    assert tracked_paths(repository) is None
    # The same bitmaps, honest: deleting shared entry 1 (b.py).
    one = struct.pack(">IIQQI", 2, 2, 1 << 33, 0b10, 0)
    link = shared_hash + one + empty
    (tmp_path / ".git" / "index").write_bytes(index_bytes([], b"link" + struct.pack(">I", len(link)) + link))
    assert tracked_paths(repository) == ["a.py"]


@pytest.mark.parametrize("version", [2, 4])
def test_damaged_indexes_are_refused_or_read_never_a_crash(tmp_path, version):
    root = committed_repository(tmp_path)
    git(root, "update-index", "--index-version", str(version))
    repository = find_repository(root.resolve())
    good = (root / ".git" / "index").read_bytes()
    generator = random.Random(version)
    outcomes = set()
    for trial in range(300):
        damaged = bytearray(good[:-20])
        for _ in range(generator.randint(1, 4)):
            damaged[generator.randrange(len(damaged))] = generator.randrange(256)
        if trial % 3 == 0:
            del damaged[generator.randrange(12, len(damaged)) :]
        # A correct checksum, so that the parser itself meets the damage.
        (root / ".git" / "index").write_bytes(bytes(damaged) + hashlib.sha1(damaged).digest())
        paths = tracked_paths(repository)
        outcomes.add(paths is None)
        assert paths is None or all(isinstance(path, str) and not path.startswith("/") for path in paths)
    assert outcomes == {True, False}
