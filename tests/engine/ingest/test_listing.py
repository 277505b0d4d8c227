"""Listing a folder inside a git work tree: git's answer, computed without running git, so that a
hostile repository's configuration never runs a program, and the repository is never written to."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from ingest_documents import git, git_environment, write_files

from kimi_desk.engine.ingest import load_path
from kimi_desk.engine.ingest.listing import list_folder, list_with_git, reading_order_key

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")

# Every hook git knows of (githooks(5), git 2.39 and later).
HOOK_NAMES = [
    "applypatch-msg",
    "pre-applypatch",
    "post-applypatch",
    "pre-commit",
    "pre-merge-commit",
    "prepare-commit-msg",
    "commit-msg",
    "post-commit",
    "pre-rebase",
    "post-checkout",
    "post-merge",
    "pre-push",
    "pre-receive",
    "update",
    "proc-receive",
    "post-receive",
    "post-update",
    "reference-transaction",
    "push-to-checkout",
    "pre-auto-gc",
    "post-rewrite",
    "sendemail-validate",
    "fsmonitor-watchman",
    "p4-changelist",
    "p4-prepare-changelist",
    "p4-post-changelist",
    "p4-pre-submit",
    "post-index-change",
]


def listed_by_git(folder: Path) -> list[str]:
    """`git ls-files --cached --others --exclude-standard` in `folder`, in reading order (the tests'
    own git run on a repository that is not hostile yet)."""
    output = git(folder, "ls-files", "--cached", "--others", "--exclude-standard", "-z")
    return sorted(dict.fromkeys(path for path in output.split("\0") if path), key=reading_order_key)


def tree_state(folder: Path) -> dict[str, tuple]:
    """Everything under `folder`, .git included: each entry's type, size, mtime and content hash."""
    state = {}
    for directory, folders, files in os.walk(folder):
        for name in folders + files:
            path = Path(directory, name)
            status = path.lstat()
            content = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(status.st_mode) else None
            state[path.relative_to(folder).as_posix()] = (status.st_mode, status.st_size, status.st_mtime_ns, content)
    state["."] = (folder.stat().st_mode, folder.stat().st_mtime_ns)
    return state


def make_hostile(repository: Path, outside: Path) -> Path:
    """Configure `repository` so that git runs a program at every opportunity it has; each program
    appends a line to a marker file outside the repository. Written as files, so that setting it up
    runs nothing. Returns the marker's path (it does not exist yet)."""
    marker = outside / "marker"
    program = outside / "evil"
    program.write_text(f'#!/bin/sh\necho "$0 $*" >> {marker}\n')
    program.chmod(0o755)
    hooks = outside / "hooks"
    hooks.mkdir()
    for folder in (hooks, repository / ".git" / "hooks"):
        for name in HOOK_NAMES:
            (folder / name).write_text(f"#!/bin/sh\necho hook {name} >> {marker}\n")
            (folder / name).chmod(0o755)
    evil = str(program)
    included = outside / "included.config"
    included.write_text(
        f"[core]\n\tfsmonitor = {evil} included-fsmonitor\n\tpager = {evil} included-pager\n"
        f"[diff]\n\texternal = {evil} included-diff\n[credential]\n\thelper = !{evil} included-credential\n"
        f'[filter "x"]\n\tprocess = {evil} included-filter-process\n'
    )
    with (repository / ".git" / "config").open("a") as config:
        config.write(
            f"[core]\n\trepositoryformatversion = 1\n\tfsmonitor = {evil} fsmonitor\n\thooksPath = {hooks}\n"
            f"\tpager = {evil} pager\n\teditor = {evil} editor\n\tsshCommand = {evil} ssh\n\taskPass = {evil} askpass\n"
            f"\tgitProxy = {evil} gitproxy\n\talternateRefsCommand = {evil} alternate-refs\n\tuntrackedCache = true\n"
            f"[diff]\n\texternal = {evil} diff-external\n"
            f'[diff "x"]\n\ttextconv = {evil} textconv\n\tcommand = {evil} diff-command\n'
            f'[merge "x"]\n\tdriver = {evil} merge-driver\n'
            f'[filter "x"]\n\tclean = {evil} clean\n\tsmudge = {evil} smudge\n\tprocess = {evil} filter-process\n'
            "\trequired = true\n"
            f"[credential]\n\thelper = !{evil} credential\n"
            f'[credential "https://example.com"]\n\thelper = !{evil} credential-url\n'
            f"[alias]\n\tls-files = !{evil} alias-ls-files\n\tst = !{evil} alias\n"
            f"[pager]\n\tls-files = {evil} pager-ls-files\n\tstatus = {evil} pager-status\n"
            f"[sequence]\n\teditor = {evil} sequence-editor\n"
            f'[gpg]\n\tprogram = {evil} gpg\n[gpg "ssh"]\n\tprogram = {evil} gpg-ssh\n'
            f"[uploadpack]\n\tpackObjectsHook = {evil} pack-objects-hook\n"
            f'[remote "origin"]\n\turl = ext::{evil} remote-ext\n\tuploadpack = {evil} upload-pack\n'
            f"\treceivepack = {evil} receive-pack\n\tvcs = evil\n\tpromisor = true\n\tpartialclonefilter = blob:none\n"
            "[extensions]\n\tpartialClone = origin\n"
            '[protocol]\n\tallow = always\n[protocol "ext"]\n\tallow = always\n'
            f'[url "ext::{evil} url"]\n\tinsteadOf = https://\n'
            "[gc]\n\tauto = 1\n\tautoDetach = false\n[maintenance]\n\tauto = true\n"
            f'[hook "evil"]\n\tcommand = {evil} config-hook\n\tevent = post-index-change\n'
            f'[web]\n\tbrowser = evil\n[browser "evil"]\n\tcmd = {evil} browser\n'
            f'[include]\n\tpath = {included}\n[includeIf "gitdir:/"]\n\tpath = {included}\n'
        )
    return marker


def test_a_hostile_repository_configuration_runs_nothing_and_changes_nothing(tmp_path):
    repository = tmp_path / "repo"
    outside = tmp_path / "outside"
    outside.mkdir()
    write_files(
        repository,
        {
            "README.md": "# Project\n",
            "src/main.py": "print('hi')\n",
            ".gitignore": "*.log\nbuild/\n",
            ".gitattributes": "* filter=x diff=x merge=x\n",
            "tracked.log": "tracked although ignored\n",
        },
    )
    git(repository, "init", "--quiet")
    git(repository, "add", "--force", ".")
    git(repository, "commit", "--quiet", "-m", "initial")
    write_files(
        repository,
        {
            "notes.txt": "untracked, kept\n",
            "debug.log": "ignored\n",
            "build/out.txt": "ignored\n",
            "secret.txt": "excluded by info/exclude\n",
            "src/new.py": "untracked too\n",
        },
    )
    (repository / ".git" / "info" / "exclude").write_text("secret.txt\n")
    expected = listed_by_git(repository)
    marker = make_hostile(repository, outside)
    before = tree_state(repository)

    document = load_path(repository)

    assert not marker.exists(), marker.read_text()
    assert document.listing_source == "git"
    assert [file.relative_path for file in document.files] == expected
    assert expected == [
        "README.md",
        ".gitattributes",
        ".gitignore",
        "notes.txt",
        "tracked.log",
        "src/main.py",
        "src/new.py",
    ]
    assert tree_state(repository) == before
    # The configuration is really hostile: git itself, run as the loader used to run it, obeys it.
    subprocess.run(["git", "ls-files"], cwd=repository, env=git_environment(), capture_output=True, check=False)
    assert "fsmonitor" in marker.read_text()


@pytest.fixture
def varied_repository(tmp_path):
    """A work tree with most of what git's listing has to get right: nested .gitignore files,
    info/exclude, a tracked file inside an ignored folder, an untracked nested repository, a
    submodule, files with unusual names, a symbolic link, a deleted tracked file."""
    library = tmp_path / "library"
    write_files(library, {"lib.py": "x = 1\n"})
    git(library, "init", "--quiet")
    git(library, "add", ".")
    git(library, "commit", "--quiet", "-m", "library")
    repository = tmp_path / "repo"
    write_files(
        repository,
        {
            ".gitignore": "*.tmp\n/out/\ncache/\n!keep.tmp\n",
            "README.md": "# r\n",
            "src/a.py": "a\n",
            "src/.gitignore": "generated_*.py\n!generated_keep.py\n",
            "src/generated_x.py": "g\n",
            "src/generated_keep.py": "k\n",
            "out/forced.txt": "forced\n",
            "gone.txt": "gone\n",
            "docs/guide.md": "guide\n",
            "docs/cache/page.html": "<p>cached</p>\n",
            "name with spaces.txt": "s\n",
            "ünïcödé.md": "u\n",
            ".github/ci.yml": "on: push\n",
            ".github/.gitignore": "*.local\n",
            ".github/forced.local": "tracked although ignored\n",
        },
    )
    git(repository, "init", "--quiet")
    git(repository, "add", ".")
    git(repository, "add", "--force", "out/forced.txt", ".github/forced.local")
    git(repository, "-c", "protocol.file.allow=always", "submodule", "add", "--quiet", str(library), "vendor/library")
    git(repository, "commit", "--quiet", "-m", "initial")
    write_files(
        repository,
        {
            "scratch.tmp": "ignored\n",
            "keep.tmp": "re-included\n",
            "out/new.txt": "ignored folder\n",
            "src/generated_y.py": "ignored\n",
            "src/fresh.py": "untracked\n",
            "private.key": "excluded\n",
            "nested/inner.py": "inner\n",
            "docs/cache/other.html": "ignored\n",
            "docs/new.md": "new\n",
            ".github/x.local": "ignored\n",
            ".github/y.yml": "untracked\n",
        },
    )
    git(repository / "nested", "init", "--quiet")
    (repository / ".git" / "info" / "exclude").write_text("*.key\n")
    (repository / "link.txt").symlink_to("README.md")
    (repository / "gone.txt").unlink()
    return repository


@pytest.mark.parametrize("subfolder", ["", "src", "docs", "vendor", ".github"])
def test_listing_is_what_git_ls_files_lists(varied_repository, subfolder):
    folder = varied_repository / subfolder
    ours, _ = list_with_git(folder.resolve())
    assert sorted(ours, key=reading_order_key) == listed_by_git(folder)


def test_a_folder_git_ignores_is_not_listed_as_git_would(varied_repository):
    assert list_with_git((varied_repository / "out").resolve()) is None
    assert list_with_git((varied_repository / "docs" / "cache").resolve()) is None


@pytest.mark.parametrize("version", ["2", "3", "4"])
def test_every_index_version_gives_the_same_listing(varied_repository, version):
    git(varied_repository, "update-index", "--index-version", version)
    ours, _ = list_with_git(varied_repository.resolve())
    assert sorted(ours, key=reading_order_key) == listed_by_git(varied_repository)


def test_git_folder_and_nested_repository_are_never_entered(varied_repository):
    listing = list_folder(varied_repository.resolve())
    assert listing.source == "git"
    assert "nested/" in listing.paths and "vendor/library" in listing.paths
    assert not any(path.startswith((".git/", "nested/inner", "vendor/library/")) for path in listing.paths)


def test_a_fifo_index_or_gitignore_is_never_opened(tmp_path):
    write_files(tmp_path, {"a.py": "a\n", "sub/b.py": "b\n"})
    git(tmp_path, "init", "--quiet")
    git(tmp_path, "add", ".")
    os.mkfifo(tmp_path / "sub" / ".gitignore")
    (tmp_path / ".git" / "index").unlink()
    os.mkfifo(tmp_path / ".git" / "index")
    result = []
    reader = threading.Thread(target=lambda: result.append(list_folder(tmp_path.resolve())), daemon=True)
    reader.start()
    reader.join(timeout=20)
    assert result, "listing hung on a FIFO"
    # The index cannot be read, so the folder is walked as if git had refused it.
    assert result[0].source == "gitignore"
    assert set(result[0].paths) == {"a.py", "sub/.gitignore", "sub/b.py"}


def test_a_damaged_index_falls_back_to_the_walk(tmp_path):
    write_files(tmp_path, {"a.py": "a\n", ".gitignore": "*.log\n", "x.log": "log\n"})
    git(tmp_path, "init", "--quiet")
    git(tmp_path, "add", ".")
    index = tmp_path / ".git" / "index"
    index.write_bytes(index.read_bytes()[:-30])
    listing = list_folder(tmp_path.resolve())
    assert listing.source == "gitignore"
    assert listing.paths == (".gitignore", "a.py")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to give files away")
def test_a_repository_of_another_user_is_not_taken_as_a_work_tree(tmp_path):
    # git's safe.directory rule: someone else's .git above a folder must not decide its listing.
    write_files(tmp_path, {"project/a.py": "a\n", "project/b.log": "b\n", ".gitignore": "*.log\n"})
    git(tmp_path, "init", "--quiet")
    os.chown(tmp_path / ".git", 4321, 4321)
    listing = list_folder((tmp_path / "project").resolve())
    assert listing.source == "gitignore"
    assert listing.paths == ("a.py", "b.log")
