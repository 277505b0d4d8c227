"""ingest, ask and sessions as a user runs them: real processes, a tiny real model, KIMI_DESK_HOME."""

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest


@pytest.fixture
def run(tmp_path, chat_checkpoint):
    env = {**os.environ, "KIMI_DESK_HOME": str(tmp_path / "home")}

    def kimi_desk(*args, check=True):
        result = subprocess.run(
            [sys.executable, "-m", "kimi_desk.app.cli", *args], capture_output=True, text=True, env=env
        )
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
    # Piped: plain progress lines, no bar redrawn in place, no terminal codes.
    said = result.stderr.splitlines()
    assert len(session_id) == 8 and "\r" not in result.stderr and "\x1b" not in result.stderr
    assert said[0].startswith("repo: ") and " tokens to read, about " in said[0]
    assert said[-1].startswith("reading 100%: ") and "5/5 files" in said[-1]

    again = json.loads(run("ingest", str(repo), "--model", str(chat_checkpoint), "--json").stdout)
    assert again["id"] == session_id and again["files"] == 5 and again["tokens"] > 50

    # The session remembers its model: no --model needed to ask. Each ask starts a thread, named on stderr.
    first = json.loads(run("ask", session_id, "What is VALUE_3?", "--json", "--max-new-tokens", "8").stdout)
    assert first["finish_reason"] in ("stop", "length") and first["question"] == "What is VALUE_3?"
    assert len(first["thread"]) == 8 and first["turn"] == 1 and isinstance(first["citations"], list)
    second = json.loads(run("ask", session_id, "What is VALUE_3?", "--json", "--max-new-tokens", "8").stdout)
    assert second["answer"] == first["answer"] and second["thread"] != first["thread"]  # greedy by default
    streamed = run("ask", session_id, "What is VALUE_3?", "--max-new-tokens", "8")
    assert streamed.stdout == first["answer"] + "\n"
    third = streamed.stderr.strip().splitlines()[-1]
    assert third.startswith("kimi-desk: thread ") and f"kimi-desk ask {session_id} -c" in third
    third = third.split()[2]

    # -c continues the most recent thread, --thread a given one.
    follow = json.loads(run("ask", session_id, "And VALUE_4?", "-c", "--json", "--max-new-tokens", "8").stdout)
    assert follow["thread"] == third and follow["turn"] == 2
    again = json.loads(
        run("ask", session_id, "And VALUE_1?", "--thread", first["thread"], "--json", "--max-new-tokens", "8").stdout
    )
    assert again["thread"] == first["thread"] and again["turn"] == 2
    missing = run("ask", session_id, "x", "--thread", "0000aaaa", check=False)
    assert missing.returncode == 2 and "has no thread '0000aaaa'" in missing.stderr
    both = run("ask", session_id, "x", "-c", "--thread", third, check=False)
    assert both.returncode == 2 and len(both.stderr.strip().splitlines()) == 1

    listing = json.loads(run("sessions", "list", "--json").stdout)
    assert [s["id"] for s in listing] == [session_id] and listing[0]["questions"] == 5 and listing[0]["threads"] == 3
    shown = json.loads(run("sessions", "show", session_id, "--json").stdout)
    assert shown["checkpoints"][-1] == shown["tokens"] and len(shown["threads"]) == 3
    assert [len(t["turns"]) for t in shown["threads"] if t["id"] == third] == [2]
    assert [s["path"] for s in shown["sources"]] == [f"mod_{i}.py" for i in range(5)]
    assert all(s["tokens"] > 0 for s in shown["sources"])
    text = run("sessions", "show", session_id).stdout
    assert "sources (5 files, tokens each):" in text and "mod_4.py" in text and f"thread {third}: 2 turns" in text
    assert "repo" in run("sessions", "list").stdout
    assert run("sessions").stdout == run("sessions", "list").stdout  # listing is what a bare `sessions` does

    markdown = tmp_path / "thread.md"
    assert run("sessions", "export-thread", session_id, third, str(markdown)).stdout.strip() == str(markdown)
    written = markdown.read_text()
    assert written.startswith(f"# repo: thread {third}") and "## 1. What is VALUE_3?" in written
    assert "## 2. And VALUE_4?" in written
    refused = run("sessions", "export-thread", session_id, third, str(markdown), check=False)
    assert refused.returncode == 2 and "already exists" in refused.stderr

    archive = tmp_path / "out.zip"
    run("sessions", "export", session_id, str(archive))
    run("sessions", "rm", session_id)
    assert json.loads(run("sessions", "list", "--json").stdout) == []
    imported = run("sessions", "import", str(archive)).stdout.strip()
    after = json.loads(run("ask", imported, "What is VALUE_3?", "--json", "--max-new-tokens", "8").stdout)
    assert after["answer"] == first["answer"]
    continued = run("ask", imported, "And VALUE_4?", "--thread", third, "--json", "--max-new-tokens", "8")
    assert json.loads(continued.stdout)["turn"] == 3 and "rebuilt" not in continued.stderr

    # --turn asks again at a turn: the last one in place, an earlier one as a new thread.
    redo = json.loads(
        run("ask", imported, "And VALUE_2?", "--thread", third, "--turn", "3", "--json", "--max-new-tokens", "8").stdout
    )
    assert redo["thread"] == third and redo["turn"] == 3 and redo["question"] == "And VALUE_2?"
    branch = json.loads(
        run(
            "ask", imported, "What is VALUE_0?", "--thread", third, "--turn", "1", "--json", "--max-new-tokens", "8"
        ).stdout
    )
    assert branch["thread"] != third and branch["turn"] == 1
    kept = json.loads(run("sessions", "show", imported, "--json").stdout)
    assert [len(t["turns"]) for t in kept["threads"] if t["id"] == third] == [3]
    alone = run("ask", imported, "x", "--turn", "1", check=False)
    assert alone.returncode == 2 and "--thread ID or -c" in alone.stderr
    beyond = run("ask", imported, "x", "--thread", third, "--turn", "9", check=False)
    assert beyond.returncode == 2 and len(beyond.stderr.strip().splitlines()) == 1
    assert "has 3 turns; there is no turn 9 to ask at (1 to 4)" in beyond.stderr


def test_files_a_limit_left_out_are_said_on_stderr(run, tmp_path, chat_checkpoint):
    repo = make_repo(tmp_path / "repo")
    (repo / "big.py").write_text("x = 1\n" * 1000)
    said = [
        "kimi-desk: 1 file not read: larger than the limit of 4.0 KiB per file (--max-file-bytes N)",
        "kimi-desk: 2 files not read: the limit of 3 files was reached (--max-files N)",
    ]
    options = ["--model", str(chat_checkpoint), "--max-files", "3", "--max-file-bytes", "4096"]
    first = run("ingest", str(repo), *options)
    notices = [line for line in first.stderr.splitlines() if line.startswith("kimi-desk: ")]
    assert sorted(notices) == said and len(first.stdout.strip()) == 8
    # Read already: nothing to read, but the document still lacks those files.
    again = json.loads(run("ingest", str(repo), *options, "--json").stdout)
    assert again["files"] == 3
    assert sorted(run("ingest", str(repo), *options).stderr.splitlines()) == sorted(
        [*said, "repo: already read (203 tokens), nothing to do"]
    )


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
        (["ingest", ".", "--max-files", "0"], "argument --max-files: must be at least 1"),
        (["ingest", ".", "--max-total-bytes", "-5"], "argument --max-total-bytes: must be at least 1"),
        (["ingest", ".", "--max-files", "many"], "'many' is not a whole number"),
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


def file_size_limited(limit: int):
    """For subprocess: the kernel refuses writes past `limit` bytes (EFBIG), as a full disk would."""

    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    return apply


def test_a_disk_that_refuses_writes_is_one_line_and_loses_nothing(run, tmp_path, chat_checkpoint):
    session_id = run("ingest", str(make_repo(tmp_path / "repo")), "--model", str(chat_checkpoint)).stdout.strip()
    run("ask", session_id, "What is VALUE_1?", "--max-new-tokens", "4")
    record = tmp_path / "home" / "sessions" / session_id / "session.json"
    before = record.read_bytes()
    env = {**os.environ, "KIMI_DESK_HOME": str(tmp_path / "home")}

    def limited(*args, limit):
        return subprocess.run(
            [sys.executable, "-m", "kimi_desk.app.cli", *args],
            capture_output=True,
            text=True,
            env=env,
            preexec_fn=file_size_limited(limit),
        )

    asked = limited("ask", session_id, "What is VALUE_2?", "--max-new-tokens", "4", limit=len(before) + 16)
    assert asked.returncode == 2 and "Traceback" not in asked.stderr
    assert asked.stderr.strip().splitlines()[-1].startswith("kimi-desk: error: cannot write")
    assert record.read_bytes() == before  # the earlier turns are intact
    exported = limited("sessions", "export", session_id, str(tmp_path / "out.zip"), limit=4096)
    assert exported.returncode == 2 and len(exported.stderr.strip().splitlines()) == 1
    assert "cannot write" in exported.stderr and "larger than" in exported.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "repo"]  # no archive, no partial file
    assert json.loads(run("sessions", "list", "--json").stdout)[0]["questions"] == 1


def test_a_read_only_data_folder_is_one_line(tmp_path, chat_checkpoint, monkeypatch, capsys):
    from kimi_desk.app.cli import main
    from kimi_desk.engine import atomic

    monkeypatch.setenv("KIMI_DESK_HOME", str(tmp_path / "home"))
    assert main(["ingest", str(make_repo(tmp_path / "repo")), "--model", str(chat_checkpoint)]) == 0
    session_id = capsys.readouterr().out.strip()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(atomic.tempfile, "mkstemp", read_only)
    assert main(["ask", session_id, "What is VALUE_1?", "--max-new-tokens", "3"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "the disk is read-only" in error[0] and "session.json" in error[0]


def test_an_answer_length_below_one_is_refused_and_records_nothing(run, tmp_path, chat_checkpoint):
    session_id = run("ingest", str(make_repo(tmp_path / "repo")), "--model", str(chat_checkpoint)).stdout.strip()
    for bad in ("-5", "0", "x"):
        result = run("ask", session_id, "hi", "--max-new-tokens", bad, check=False)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert json.loads(run("sessions", "show", session_id, "--json").stdout)["threads"] == []


def test_names_and_sources_print_without_terminal_escapes(run, tmp_path, chat_checkpoint):
    hostile = tmp_path / "repo\x1b]0;owned\x07\x1b[31m\u202e"
    session_id = run("ingest", str(make_repo(hostile)), "--model", str(chat_checkpoint)).stdout.strip()
    for args in (["sessions", "list"], ["sessions", "show", session_id]):
        out = run(*args).stdout
        assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out and "\\u001b" in out


def test_unreadable_sessions_are_said_not_hidden(run, tmp_path, chat_checkpoint):
    session_id = run("ingest", str(make_repo(tmp_path / "repo")), "--model", str(chat_checkpoint)).stdout.strip()
    (tmp_path / "home" / "sessions" / session_id / "session.json").write_text("{ torn")
    listing = run("sessions", "list")
    assert "no sessions yet" not in listing.stdout
    assert f"1 session cannot be read and is not listed ({session_id}:" in listing.stderr
    assert "sessions rm ID" in listing.stderr


def test_a_session_whose_model_is_elsewhere_says_to_pass_model(run, tmp_path, chat_checkpoint):
    model = tmp_path / "model-copy"
    shutil.copytree(chat_checkpoint, model)
    session_id = run("ingest", str(make_repo(tmp_path / "repo")), "--model", str(model)).stdout.strip()
    shutil.rmtree(model)  # as on the machine a session was imported to
    result = run("ask", session_id, "What is VALUE_1?", check=False)
    assert result.returncode == 2 and "pass --model PATH" in result.stderr and str(model) in result.stderr
    assert run("ask", session_id, "What is VALUE_1?", "--model", str(chat_checkpoint), "--max-new-tokens", "2")


def test_a_session_read_with_the_embedded_model_elsewhere_uses_it_here(run, tmp_path):
    from kimi_desk.engine.session import SessionStore

    notes = tmp_path / "notes.md"
    notes.write_text("# Notes\nThe meeting is on Tuesday.\n")
    session_id = run("ingest", str(notes)).stdout.strip()
    SessionStore(tmp_path / "home").get(session_id).update(model_source="/home/someone/else/kimi_desk/assets/model")
    result = run("ask", session_id, "When is the meeting?", "--max-new-tokens", "3", check=False)
    assert result.returncode == 0, result.stderr
