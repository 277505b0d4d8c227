"""Where re-reading a changed folder has to start."""

from __future__ import annotations

from ingest_documents import write_files
from kimi_desk.engine.ingest import (
    FileFingerprint,
    fingerprint_document,
    first_changed_index,
    load_path,
    unchanged_segments,
)


def fingerprints(*pairs: str) -> list[FileFingerprint]:
    """("a.py:1", "b.py:2") -> fingerprints with those paths and (fake) hashes."""
    return [FileFingerprint(*pair.split(":")) for pair in pairs]


def test_identical_lists_are_unchanged_to_the_end():
    files = fingerprints("a:1", "b:2", "c:3")
    assert first_changed_index(files, files) == 3
    assert first_changed_index([], []) == 0


def test_first_changed_added_removed_renamed_or_moved_file():
    previous = fingerprints("a:1", "b:2", "c:3")
    assert first_changed_index(previous, fingerprints("a:1", "b:9", "c:3")) == 1
    assert first_changed_index(previous, fingerprints("a:1", "a2:7", "b:2", "c:3")) == 1
    assert first_changed_index(previous, fingerprints("a:1", "c:3")) == 1
    assert first_changed_index(previous, fingerprints("a:1", "b:2", "d:3")) == 2
    assert first_changed_index(previous, fingerprints("b:2", "a:1", "c:3")) == 0
    assert first_changed_index(previous, fingerprints("a:1", "b:2", "c:3", "d:4")) == 3
    assert first_changed_index(previous, fingerprints("a:1", "b:2")) == 2


def test_a_reloaded_folder_with_one_edited_file_resumes_at_that_file(tmp_path):
    write_files(tmp_path, {"a.txt": "a\n", "b.txt": "b\n", "c.txt": "c\n"})
    before = load_path(tmp_path)
    write_files(tmp_path, {"b.txt": "b, edited\n"})
    after = load_path(tmp_path)

    assert first_changed_index(before.files, after.files) == 1
    # Segments are [tree, a, b, c]: the tree and a.txt can be kept.
    assert unchanged_segments(fingerprint_document(before), fingerprint_document(after)) == 2
    assert before.segments()[:2] == after.segments()[:2]
    assert before.segments()[2] != after.segments()[2]


def test_adding_a_file_changes_the_tree_so_everything_is_read_again(tmp_path):
    write_files(tmp_path, {"a.txt": "a\n", "b.txt": "b\n"})
    before = fingerprint_document(load_path(tmp_path))
    write_files(tmp_path, {"c.txt": "c\n"})
    after = fingerprint_document(load_path(tmp_path))
    assert first_changed_index(before.files, after.files) == 2
    assert unchanged_segments(before, after) == 0


def test_an_unchanged_folder_keeps_every_segment(tmp_path):
    write_files(tmp_path, {"a.txt": "a\n", "b.txt": "b\n"})
    first = fingerprint_document(load_path(tmp_path))
    second = fingerprint_document(load_path(tmp_path))
    assert unchanged_segments(first, second) == 3
