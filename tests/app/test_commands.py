"""ingest, ask and sessions as a user runs them: real processes, a tiny real model, KIMI_DESK_HOME."""

import json
import os
import subprocess
import sys

import pytest


@pytest.fixture
def run(tmp_path, chat_checkpoint):
    env = {**os.environ, "KIMI_DESK_HOME": str(tmp_path / "home")}

    def kimi_desk(*args, check=True):
        result = subprocess.run([sys.executable, "-m", "kimi_desk.app.cli", *args], capture_output=True, text=True,
                                env=env)
        if check:
            assert result.returncode == 0, result.stderr
        return result

    return kimi_desk


def make_repo(root):
    root.mkdir()
    for i in range(5):
        (root / f"mod_{i}.py").write_text(f"VALUE_{i} = {i * 11}\n")
    return root


def test_ingest_ask_and_manage_sessions(run, tmp_path, chat_checkpoint):
    repo = make_repo(tmp_path / "repo")
    result = run("ingest", str(repo), "--model", str(chat_checkpoint))
    session_id = result.stdout.strip()
    assert len(session_id) == 8 and result.stderr == ""  # piped: no progress output

    again = json.loads(run("ingest", str(repo), "--model", str(chat_checkpoint), "--json").stdout)
    assert again["id"] == session_id and again["files"] == 5 and again["tokens"] > 50

    # The session remembers its model: no --model needed to ask.
    first = json.loads(run("ask", session_id, "What is VALUE_3?", "--json", "--max-new-tokens", "8").stdout)
    assert first["finish_reason"] in ("stop", "length") and first["question"] == "What is VALUE_3?"
    second = json.loads(run("ask", session_id, "What is VALUE_3?", "--json", "--max-new-tokens", "8").stdout)
    assert second["answer"] == first["answer"]  # greedy by default
    streamed = run("ask", session_id, "What is VALUE_3?", "--max-new-tokens", "8").stdout
    assert streamed == first["answer"] + "\n"

    listing = json.loads(run("sessions", "list", "--json").stdout)
    assert [s["id"] for s in listing] == [session_id] and listing[0]["questions"] == 3
    shown = json.loads(run("sessions", "show", session_id, "--json").stdout)
    assert shown["checkpoints"][-1] == shown["tokens"] and len(shown["transcript"]) == 3
    assert "repo" in run("sessions", "list").stdout

    archive = tmp_path / "out.zip"
    run("sessions", "export", session_id, str(archive))
    run("sessions", "rm", session_id)
    assert json.loads(run("sessions", "list", "--json").stdout) == []
    imported = run("sessions", "import", str(archive)).stdout.strip()
    after = json.loads(run("ask", imported, "What is VALUE_3?", "--json", "--max-new-tokens", "8").stdout)
    assert after["answer"] == first["answer"]


def test_files_a_limit_left_out_are_said_on_stderr(run, tmp_path, chat_checkpoint):
    repo = make_repo(tmp_path / "repo")
    (repo / "big.py").write_text("x = 1\n" * 1000)
    said = [
        "kimi-desk: 1 file not read: larger than the limit of 4.0 KiB per file (--max-file-bytes N)",
        "kimi-desk: 2 files not read: the limit of 3 files was reached (--max-files N)",
    ]
    options = ["--model", str(chat_checkpoint), "--max-files", "3", "--max-file-bytes", "4096"]
    first = run("ingest", str(repo), *options)
    assert sorted(first.stderr.splitlines()) == said and len(first.stdout.strip()) == 8
    # Read already: nothing to read, but the document still lacks those files.
    again = json.loads(run("ingest", str(repo), *options, "--json").stdout)
    assert again["files"] == 3
    assert sorted(run("ingest", str(repo), *options).stderr.splitlines()) == said


@pytest.mark.parametrize(
    "args,message",
    [
        (["ask", "deadbeef", "hi"], "no session 'deadbeef'"),
        (["sessions", "show", "../x"], "is not a session id"),
        (["sessions", "rm", "deadbeef"], "no session 'deadbeef'"),
        (["sessions", "import", "/nonexistent.zip"], "no such file"),
        (["ingest", "/nonexistent"], "no such file or folder"),
        (["ingest", ".", "--model", "/tmp"], "not a model folder"),
        (["ask"], "the following arguments are required"),
        (["ingest", ".", "--max-files", "0"], "--max-files must be at least 1"),
        (["ingest", ".", "--max-total-bytes", "-5"], "--max-total-bytes must be at least 1"),
        (["ingest", ".", "--max-files", "many"], "invalid int value"),
    ],
)
def test_bad_input_is_one_line(run, args, message):
    result = run(*args, check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_bad_documents_are_one_line(run, tmp_path, chat_checkpoint):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run("ingest", str(empty), "--model", str(chat_checkpoint), check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.7\n garbage")
    result = run("ingest", str(broken), "--model", str(chat_checkpoint), check=False)
    assert result.returncode == 2 and "broken.pdf" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_quantize_fp8_reads_and_answers(run, tmp_path, chat_checkpoint):
    repo = make_repo(tmp_path / "repo")
    info = json.loads(run("ingest", str(repo), "--model", str(chat_checkpoint), "--quantize", "fp8", "--json").stdout)
    assert info["tokens"] > 50
    answer = run("ask", info["id"], "What is VALUE_3?", "--quantize", "fp8")
    assert answer.returncode == 0
    bad = run("ingest", str(repo), "--model", str(chat_checkpoint), "--quantize", "int3", check=False)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr and "Traceback" not in bad.stderr


def test_quantization_is_chosen_by_what_fits(tmp_path):
    """--quantize auto keeps bf16 where it fits, takes fp8 (and says so) where only fp8 fits, and refuses
    with the bf16 message where nothing fits; 'none' and 'fp8' are taken as asked."""
    from kimi_desk.app.commands import fitting_quantization
    from kimi_desk.engine.hub import MemoryCheckError
    from kimi_desk.engine.random_checkpoint import kimi_linear_48b_config

    folder = tmp_path / "Kimi-Linear-48B-A3B-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(kimi_linear_48b_config().to_dict()))
    said = []
    assert fitting_quantization(folder, "cpu", "auto", said.append, available_bytes=200 * 10**9) is None
    assert said == []
    assert fitting_quantization(folder, "cpu", "auto", said.append, available_bytes=75 * 10**9) == "fp8"
    assert len(said) == 1 and "does not fit here in bfloat16" in said[0] and "fp8" in said[0]
    with pytest.raises(MemoryCheckError, match="in bfloat16 .*--quantize fp8"):
        fitting_quantization(folder, "cpu", "auto", available_bytes=30 * 10**9)
    with pytest.raises(MemoryCheckError):
        fitting_quantization(folder, "cpu", "none", available_bytes=75 * 10**9)
    assert fitting_quantization(folder, "cpu", "fp8", available_bytes=200 * 10**9) == "fp8"
