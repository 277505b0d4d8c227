"""`kimi-desk pull` as a user meets it, against a local stand-in for the hub (tests/hub_standin.py): the
folder on stdout, progress on a terminal only, one-line errors with exit code 2."""

import os
import pty
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hub_standin import HubStandIn, SilentHub

REPO = "moonshotai/Kimi-Linear-tiny"

# Runs the real command line. Until app/cli.py or app/commands.py registers `pull`, it is added here the
# way add_parser will be wired; once it is wired, this changes nothing.
RUN_CLI = """
import argparse, sys
from kimi_desk.app import cli, pull
_build_parser = cli.build_parser
def build_parser(*args):
    parser = _build_parser(*args)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "pull" not in commands.choices:
        pull.add_parser(commands)
    return parser
cli.build_parser = build_parser
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture
def server(chat_checkpoint):
    with HubStandIn(lifetime=60) as standin:
        standin.add_repo(REPO, chat_checkpoint, extra={"pytorch_model.bin": b"\x80\x04 a pickle" * 64})
        yield standin


def hub_env(tmp_path, endpoint, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=endpoint, HF_HUB_DISABLE_TELEMETRY="1", **extra)
    return env


def kimi_desk(*args, env, **kwargs):
    return subprocess.run(
        [sys.executable, "-c", RUN_CLI, *args], capture_output=True, text=True, env=env, timeout=60, **kwargs
    )


def assert_one_line_error(result, message):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kimi-desk: error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_pull_prints_the_folder_and_plain_progress_when_piped(server, tmp_path):
    result = kimi_desk("pull", REPO, env=hub_env(tmp_path, server.url))
    assert result.returncode == 0, result.stderr
    # stdout holds the folder alone; stderr, not a terminal, plain lines (no bar, no escape codes).
    said = result.stderr.splitlines()
    assert said[-2].startswith(f"pulling {REPO} 100%: ") and "3/3 files" in said[-2]
    assert said[-1].startswith(f"pulled {REPO} (3 files") and "\x1b" not in result.stderr
    path = Path(result.stdout.strip())
    assert path.parent.parent == tmp_path / "hf" / "hub" / "models--moonshotai--Kimi-Linear-tiny"
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert server.requests_for("pytorch_model.bin") == []

    # Offline, the same command answers from the cache without a request.
    server.requests.clear()
    again = kimi_desk("pull", REPO, env=hub_env(tmp_path, server.url, HF_HUB_OFFLINE="1"))
    assert again.returncode == 0 and again.stdout.strip() == str(path), again.stderr
    assert server.requests == []


def test_pull_shows_progress_on_a_terminal(server, tmp_path):
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", RUN_CLI, "pull", REPO],
            stdout=subprocess.PIPE,
            stderr=terminal,
            env=hub_env(tmp_path, server.url),
        )
        os.close(terminal)
        shown = b""
        while True:
            ready, _, _ = select.select([controller], [], [], 30)
            if not ready:
                break
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the terminal closes when the process exits
                break
            if not chunk:
                break
            shown += chunk
        stdout, _ = process.communicate(timeout=30)
    finally:
        os.close(controller)
    assert process.returncode == 0, shown
    text = shown.decode(errors="replace")
    assert f"pulling {REPO} 100%" in text and "3/3 files" in text
    assert f"pulled {REPO} (3 files" in text and f"--model {REPO}" in text
    assert Path(stdout.decode().strip()).is_dir()


def test_interrupted_pull_is_one_line_and_the_next_one_finishes(server, tmp_path):
    server.drop_once("model.safetensors", after_bytes=100_000, then_down=True)
    failed = kimi_desk("pull", REPO, env=hub_env(tmp_path, server.url))
    assert_one_line_error(failed, "download of model.safetensors stopped at")
    assert "run the same command again to resume" in failed.stderr
    server.up()
    again = kimi_desk("pull", REPO, env=hub_env(tmp_path, server.url))
    assert again.returncode == 0 and again.stderr.splitlines()[-1].startswith(f"pulled {REPO}"), again.stderr
    assert (Path(again.stdout.strip()) / "model.safetensors").is_file()


def test_unreachable_hub(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = kimi_desk("pull", REPO, env=hub_env(tmp_path, f"http://127.0.0.1:{port}"))
    assert_one_line_error(result, f"cannot reach the Hugging Face hub at http://127.0.0.1:{port}")


def test_a_hub_that_never_answers(tmp_path):
    """It accepts the connection and says nothing: one line after KIMI_DESK_HUB_TIMEOUT, not a hang."""
    with SilentHub() as silent:
        started = time.monotonic()
        result = kimi_desk("pull", REPO, env=hub_env(tmp_path, silent.url, KIMI_DESK_HUB_TIMEOUT="0.5"))
        assert time.monotonic() - started < 20
    assert_one_line_error(result, f"the hub at {silent.url} did not answer within 0.5 s while listing {REPO}'s files")


def test_unknown_repo_and_offline_without_cache(server, tmp_path):
    assert_one_line_error(
        kimi_desk("pull", "moonshotai/nope", env=hub_env(tmp_path, server.url)),
        "moonshotai/nope: no such model on the hub",
    )
    assert_one_line_error(
        kimi_desk("pull", REPO, env=hub_env(tmp_path, server.url, HF_HUB_OFFLINE="1")), "HF_HUB_OFFLINE is set"
    )
    assert_one_line_error(
        kimi_desk("pull", "not-a-repo", env=hub_env(tmp_path, server.url)), "'not-a-repo' is not a hub repo id"
    )
    assert server.requests_for("config.json") == []


def test_pull_help(tmp_path):
    result = kimi_desk("pull", "--help", env=hub_env(tmp_path, "http://127.0.0.1:9"))
    assert result.returncode == 0 and "usage: kimi-desk pull" in result.stdout and "--revision" in result.stdout
