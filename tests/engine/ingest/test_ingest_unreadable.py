"""Files and folders the user may not read.

Permission bits do not stop root (CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH), and these tests often
run as root. So the loader runs in a child process; when we are root, the child gives up those two
capabilities before it starts (prctl PR_CAPBSET_DROP, then exec: a root process gets only the
bounding set's capabilities), and is then refused like any other user.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest
from ingest_documents import write_files

_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE = 1
_CAP_DAC_READ_SEARCH = 2

_CHILD_SCRIPT = """
import json, sys
from kimi_desk.engine.ingest import IngestError, load_path

document = load_path(sys.argv[1])
result = {
    "files": [file.relative_path for file in document.files],
    "skipped": [[entry.relative_path, entry.category.value, entry.reason] for entry in document.skipped],
}
try:
    load_path(sys.argv[2])
    result["single"] = None
except IngestError as error:
    result["single"] = str(error)
print(json.dumps(result))
"""


def _drop_file_access_capabilities() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def run_loader_as_an_ordinary_user(folder, single_file) -> dict:
    as_root = os.geteuid() == 0
    try:
        completed = subprocess.run(
            [sys.executable, "-c", _CHILD_SCRIPT, str(folder), str(single_file)],
            preexec_fn=_drop_file_access_capabilities if as_root else None,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except subprocess.SubprocessError:
        # Raised when preexec_fn fails: this container does not let root give up capabilities.
        if as_root:
            pytest.skip("cannot drop root's file-access capabilities here")
        raise
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="capabilities and prctl are Linux's")
def test_unreadable_file_and_folder_are_skipped_and_a_lone_unreadable_file_is_an_error(tmp_path):
    folder = tmp_path / "project"
    write_files(folder, {"ok.txt": "readable\n", "locked.txt": "secret\n", "closed/inner.txt": "hidden\n"})
    (folder / "locked.txt").chmod(0)
    (folder / "closed").chmod(0)
    try:
        result = run_loader_as_an_ordinary_user(folder, folder / "locked.txt")
    finally:
        (folder / "closed").chmod(0o755)
        (folder / "locked.txt").chmod(0o644)

    assert result["files"] == ["ok.txt"]
    assert result["skipped"] == [
        ["locked.txt", "unreadable", "permission denied"],
        ["closed/", "unreadable", "permission denied"],
    ]
    assert result["single"] == "locked.txt: permission denied"
