"""Which files of a folder are candidates for reading, and in what order.

Inside a git work tree git decides (`git ls-files --cached --others --exclude-standard`: tracked
files plus untracked ones that no ignore rule excludes). Elsewhere the folder is walked with its
.gitignore files applied, nested ones included. Either way folders of dependencies and caches are
dropped, symbolic links are listed but never followed (the reader decides about them), and the
result is in reading order (see `reading_order_key`).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kimi_desk.engine.ingest.file_rules import IGNORED_FOLDER_NAMES
from kimi_desk.engine.ingest.gitignore import IgnorePattern, is_ignored, parse_gitignore
from kimi_desk.engine.ingest.records import SkipCategory, SkippedFile

# git may be slow on a huge repository or a network drive, but must not hang the ingestion.
_GIT_TIMEOUT_SECONDS = 120
# Variables that would point git at another repository than the folder's own.
_GIT_LOCATION_VARIABLES = (
    "GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_PREFIX", "GIT_COMMON_DIR", "GIT_OBJECT_DIRECTORY",
)


@dataclass(frozen=True)
class FolderListing:
    """Candidate files (POSIX paths relative to the folder) in reading order, and what was dropped."""

    # "git" or "gitignore": who decided what is ignored.
    source: str
    paths: tuple[str, ...]
    skipped: tuple[SkippedFile, ...]


def list_folder(folder: Path) -> FolderListing:
    """The candidate files of `folder`, from git when it is inside a work tree, else by walking it."""
    git_paths = list_with_git(folder)
    if git_paths is not None:
        return _finish_listing("git", git_paths, [])
    paths, skipped = list_with_gitignore(folder)
    return _finish_listing("gitignore", paths, skipped)


def reading_order_key(relative_path: str) -> tuple[tuple[int, int, str, str], ...]:
    """Sort key for reading order: folder by folder, a folder's files before its subfolders,
    its README first, then names in case-insensitive order (exact name as the tie-break).

    The README introduces what follows it; files before subfolders put a project's top-level
    description and configuration before its sources. A path ending with "/" is a folder (as in
    skip entries) and sorts where its contents would start.
    """
    is_folder = relative_path.endswith("/")
    parts = relative_path.rstrip("/").split("/")
    folder_keys = tuple((1, 0, part.casefold(), part) for part in parts[:-1])
    name = parts[-1]
    if is_folder:
        return (*folder_keys, (1, 0, name.casefold(), name))
    is_readme = 0 if name.casefold().startswith("readme") else 1
    return (*folder_keys, (0, is_readme, name.casefold(), name))


def list_with_git(folder: Path) -> list[str] | None:
    """git's view of the files under `folder`, or None when git has none to give: not a work tree,
    git missing or failing, or a folder that git itself ignores (say build/, opened on purpose),
    where git would list nothing and the folder's own .gitignore files are the better guide."""
    inside = _run_git(folder, ["rev-parse", "--is-inside-work-tree"])
    if inside is None or inside.returncode != 0 or inside.stdout.strip() != b"true":
        return None
    ignored = _run_git(folder, ["check-ignore", "--quiet", "."])
    if ignored is None or ignored.returncode == 0:
        return None
    listed = _run_git(folder, ["ls-files", "--cached", "--others", "--exclude-standard", "-z"])
    if listed is None or listed.returncode != 0:
        return None
    # A conflicted file is listed once per merge stage; keep one.
    return list(dict.fromkeys(os.fsdecode(path) for path in listed.stdout.split(b"\0") if path))


def list_with_gitignore(folder: Path) -> tuple[list[str], list[SkippedFile]]:
    """Every file under `folder` that its .gitignore files keep, without entering ignored folders."""
    paths: list[str] = []
    skipped: list[SkippedFile] = []
    # Depth-first with an explicit stack: a deep tree cannot exhaust Python's recursion limit.
    pending: list[tuple[Path, str, list[IgnorePattern]]] = [(folder, "", [])]
    while pending:
        directory, relative_directory, inherited_patterns = pending.pop()
        patterns = inherited_patterns + _read_gitignore(directory, relative_directory)
        for entry in _scan(directory, relative_directory, skipped):
            relative_path = f"{relative_directory}/{entry.name}" if relative_directory else entry.name
            is_directory = _is_real_directory(entry)
            if is_ignored(patterns, relative_path, is_directory):
                continue
            if not is_directory:
                paths.append(relative_path)
            elif entry.name in IGNORED_FOLDER_NAMES or _is_virtual_environment(entry):
                skipped.append(_ignored_folder(relative_path))
            else:
                pending.append((Path(entry.path), relative_path, patterns))
    return paths, skipped


def _finish_listing(source: str, paths: list[str], skipped: list[SkippedFile]) -> FolderListing:
    """Drop paths inside ignored folders (git may track them) and put the rest in reading order."""
    kept = []
    skipped_folders = {entry.relative_path for entry in skipped}
    for path in paths:
        ignored_folder = _first_ignored_folder(path)
        if ignored_folder is None:
            kept.append(path)
        elif ignored_folder + "/" not in skipped_folders:
            skipped_folders.add(ignored_folder + "/")
            skipped.append(_ignored_folder(ignored_folder))
    kept.sort(key=reading_order_key)
    skipped.sort(key=lambda entry: reading_order_key(entry.relative_path))
    return FolderListing(source=source, paths=tuple(kept), skipped=tuple(skipped))


def _first_ignored_folder(relative_path: str) -> str | None:
    parts = relative_path.rstrip("/").split("/")
    for depth, part in enumerate(parts[:-1]):
        if part in IGNORED_FOLDER_NAMES:
            return "/".join(parts[: depth + 1])
    return None


def _ignored_folder(relative_path: str) -> SkippedFile:
    return SkippedFile(f"{relative_path}/", SkipCategory.IGNORED_FOLDER, "dependency, cache or version-control folder")


def _run_git(folder: Path, arguments: list[str]) -> subprocess.CompletedProcess[bytes] | None:
    """The finished git command, or None when git is missing or takes too long."""
    environment = {key: value for key, value in os.environ.items() if key not in _GIT_LOCATION_VARIABLES}
    try:
        return subprocess.run(
            ["git", *arguments], cwd=folder, env=environment, capture_output=True,
            stdin=subprocess.DEVNULL, timeout=_GIT_TIMEOUT_SECONDS, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None


def _read_gitignore(directory: Path, relative_directory: str) -> list[IgnorePattern]:
    try:
        text = (directory / ".gitignore").read_bytes().decode("utf-8", errors="replace")
    except OSError:
        # Absent, a folder, or unreadable: git ignores such a .gitignore too.
        return []
    return parse_gitignore(text, relative_directory)


def _scan(directory: Path, relative_directory: str, skipped: list[SkippedFile]) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except OSError as error:
        reason = "permission denied" if isinstance(error, PermissionError) else f"cannot list: {error.strerror}"
        shown_path = f"{relative_directory}/" if relative_directory else "./"
        skipped.append(SkippedFile(shown_path, SkipCategory.UNREADABLE, reason))
        return []


def _is_real_directory(entry: os.DirEntry[str]) -> bool:
    """A directory, not a symlink to one: links are never followed, so no loop can be entered."""
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _is_virtual_environment(entry: os.DirEntry[str]) -> bool:
    """A Python virtual environment, whatever its name: it holds a pyvenv.cfg."""
    return os.path.isfile(os.path.join(entry.path, "pyvenv.cfg"))
