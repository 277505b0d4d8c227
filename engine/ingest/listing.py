"""Which files of a folder are candidates for reading, and in what order.

Inside a git work tree the listing is git's (`git ls-files --cached --others --exclude-standard`):
tracked files plus untracked ones that no ignore rule excludes. It is computed here, not by running
git, because git runs programs that the repository's own configuration names (engine/ingest/
git_index.py says why no set of overrides makes that safe): the tracked files come from the index
file, the untracked ones from a walk that applies `info/exclude` and the .gitignore files from the
work tree's top down, as git does. Elsewhere the folder is walked with its own .gitignore files,
nested ones included. Either way folders of dependencies and caches are dropped, symbolic links are
listed but never followed (the reader decides about them), and the result is in reading order (see
`reading_order_key`). Nothing here starts a process or writes a file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kimi_desk.engine.ingest import git_index
from kimi_desk.engine.ingest.file_rules import IGNORED_FOLDER_NAMES
from kimi_desk.engine.ingest.gitignore import IgnorePattern, is_ignored, parse_gitignore
from kimi_desk.engine.ingest.records import SkipCategory, SkippedFile


@dataclass(frozen=True)
class FolderListing:
    """Candidate files (POSIX paths relative to the folder) in reading order, and what was dropped."""

    # "git" or "gitignore": who decided what is ignored.
    source: str
    paths: tuple[str, ...]
    skipped: tuple[SkippedFile, ...]


def list_folder(folder: Path) -> FolderListing:
    """The candidate files of `folder` (a real path), as git lists them inside a work tree, else by
    walking it."""
    git_listing = list_with_git(folder)
    if git_listing is not None:
        return _finish_listing("git", *git_listing)
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


def list_with_git(folder: Path) -> tuple[list[str], list[SkippedFile]] | None:
    """What `git ls-files --cached --others --exclude-standard` lists under `folder`, without running
    git: tracked files from the index, then the untracked files no ignore rule excludes. None when
    git would have none to give: not a work tree, an index that cannot be read, or a folder that
    git itself ignores (say build/, opened on purpose), where git would list nothing and the
    folder's own .gitignore files are the better guide."""
    repository = git_index.find_repository(folder)
    if repository is None:
        return None
    tracked = git_index.tracked_paths(repository)
    excludes = git_index.info_exclude(repository)
    if tracked is None or excludes is None:
        return None
    prefix = "" if folder == repository.work_tree else folder.relative_to(repository.work_tree).as_posix()
    patterns = _patterns_above(repository.work_tree, prefix, parse_gitignore(excludes, ""))
    if patterns is None:
        return None
    if prefix:
        inside = f"{prefix}/"
        tracked = [path[len(inside) :] for path in tracked if path.startswith(inside)]
    untracked, skipped = _walk(folder, prefix, patterns, tracked=frozenset(tracked))
    return list(dict.fromkeys([*tracked, *untracked])), skipped


def list_with_gitignore(folder: Path) -> tuple[list[str], list[SkippedFile]]:
    """Every file under `folder` that its .gitignore files keep, without entering ignored folders."""
    return _walk(folder, "", [], tracked=None)


def _patterns_above(work_tree: Path, prefix: str, patterns: list[IgnorePattern]) -> list[IgnorePattern] | None:
    """The ignore patterns that apply at the folder `prefix` of the work tree (those of the .gitignore
    files from the top down to its parent, after `patterns`); None when they ignore the folder itself."""
    directory, relative_directory = work_tree, ""
    for part in prefix.split("/") if prefix else []:
        patterns = patterns + _read_gitignore(directory, relative_directory)
        directory, relative_directory = directory / part, _join(relative_directory, part)
        if is_ignored(patterns, relative_directory, is_directory=True):
            return None
    return patterns


def _walk(
    folder: Path, prefix: str, patterns: list[IgnorePattern], tracked: frozenset[str] | None
) -> tuple[list[str], list[SkippedFile]]:
    """The files under `folder` that no ignore pattern excludes, without entering ignored folders.

    Patterns match paths relative to the work tree's top, of which `folder` is `prefix` ("" when it
    is the top); the paths returned are relative to `folder`. With `tracked` (the folder is in a
    git work tree, these are the index's paths) the walk lists what git lists as untracked: `.git`
    is never entered, and a folder holding another repository is one entry, "name/", unless the
    index tracks it (a submodule).
    """
    paths: list[str] = []
    skipped: list[SkippedFile] = []
    # Depth-first with an explicit stack: a deep tree cannot exhaust Python's recursion limit.
    pending: list[tuple[Path, str, list[IgnorePattern]]] = [(folder, "", patterns)]
    while pending:
        directory, relative_directory, inherited_patterns = pending.pop()
        patterns = inherited_patterns + _read_gitignore(directory, _join(prefix, relative_directory))
        for entry in _scan(directory, relative_directory, skipped):
            if tracked is not None and entry.name == ".git":
                continue
            relative_path = _join(relative_directory, entry.name)
            is_directory = _is_real_directory(entry)
            if is_ignored(patterns, _join(prefix, relative_path), is_directory):
                continue
            if not is_directory:
                paths.append(relative_path)
            elif entry.name in IGNORED_FOLDER_NAMES or _is_virtual_environment(entry):
                skipped.append(_ignored_folder(relative_path))
            elif tracked is not None and os.path.lexists(os.path.join(entry.path, ".git")):
                if relative_path not in tracked:
                    paths.append(f"{relative_path}/")
            else:
                pending.append((Path(entry.path), relative_path, patterns))
    return paths, skipped


def _join(*parts: str) -> str:
    """Relative POSIX paths joined, "" standing for the top folder."""
    return "/".join(part for part in parts if part)


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


def _read_gitignore(directory: Path, relative_directory: str) -> list[IgnorePattern]:
    try:
        data = git_index.read_regular_file(directory / ".gitignore", git_index.MAX_SMALL_FILE_BYTES)
    except git_index.GitFileUnreadable:
        # A folder, a FIFO (never opened: it would wait for a writer), too large or unreadable:
        # no patterns, as git has none from a .gitignore it cannot read.
        return []
    if data is None:
        return []
    return parse_gitignore(data.decode("utf-8", errors="replace"), relative_directory)


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
