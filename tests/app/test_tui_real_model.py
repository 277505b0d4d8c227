"""The app on the real engine: a tiny random checkpoint with a real tokenizer, read and asked through
the UI (Textual's pilot), and `kimi-desk open` as installed, in a real terminal (tmux), from the
command line to an answer on the screen. The answers are random tokens (random weights); what is
checked is that they stream through the whole stack and land in the session."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from driving import drive, wait_for_answer, wait_for_screen
from fake_engine import make_folder
from textual.widgets import Input

from kimi_desk.app.settings import Settings, save_settings
from kimi_desk.app.widgets import TurnView

QUESTION = "what does helper_1 return?"
# Short greedy answers keep the tests fast; the settings file is how a user would ask for that too.
SETTINGS = Settings(temperature=0.0, max_new_tokens=8)
ANSWER_META = re.compile(r"(\d+) tokens · \d+\.\d s")


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    from kimi_desk.bench.random_checkpoint import tiny_config, write_random_checkpoint, write_small_tokenizer

    config = tiny_config(vocab_size=1024, bos_token_id=700, eos_token_id=702, pad_token_id=957)
    path = write_random_checkpoint(config, tmp_path_factory.mktemp("chat") / "model", seed=5)
    write_small_tokenizer(path)
    return path


def test_open_read_and_answer_with_the_real_engine(home, chat_checkpoint):
    from kimi_desk.app.tui import create_app
    from kimi_desk.engine.session import SessionStore

    folder = make_folder(home / "repo", n_files=4)
    # The factories are the defaults: the real model loader and the real session store.
    app = create_app(
        str(folder),
        model=str(chat_checkpoint),
        device="cpu",
        settings=SETTINGS,
        settings_file=home / "kimi-home" / "settings.toml",
    )

    async def scenario(pilot):
        chat = await wait_for_screen(pilot, "ChatScreen", timeout=120)
        assert "tokens" in str(chat.query_one("#gauge-tokens").render())
        assert f"model {chat_checkpoint.name} · cpu" in str(chat.query_one("#status-line").render())
        chat.query_one("#question", Input).value = QUESTION
        await pilot.press("enter")
        await wait_for_answer(pilot, timeout=120)
        turn = chat.query_one(TurnView)
        saved = chat.session.thread(chat.thread).turns[-1]
        assert saved.question == QUESTION and len(saved.answer_token_ids) > 0
        assert turn.answer_text == saved.answer
        assert ANSWER_META.search(str(turn.query_one(".meta").render()))
        # A follow-up continues the thread in the real engine: its state holds both turns.
        chat.query_one("#question", Input).value = "And the next one?"
        await pilot.press("enter")
        await wait_for_answer(pilot, timeout=120)
        thread = chat.session.thread(chat.thread)
        assert len(thread.turns) == 2 and len(chat.query(TurnView)) == 2
        state = pilot.app.assistant.thread_state(chat.session, chat.thread)
        assert state.position == chat.session.document_tokens + thread.tokens

    drive(app, scenario)
    assert SessionStore().list()[0].latest_thread().turns[0].question == QUESTION


def kimi_desk_command() -> str | None:
    beside_python = Path(sys.executable).with_name("kimi-desk")
    return str(beside_python) if beside_python.exists() else shutil.which("kimi-desk")


@pytest.mark.skipif(
    shutil.which("tmux") is None,
    reason="tmux not found: install it (apt-get install -y tmux) to run the terminal smoke test",
)
@pytest.mark.parametrize("model", ["checkpoint", "embedded"])
def test_kimi_desk_open_in_a_real_terminal(tmp_path, chat_checkpoint, model):
    """`embedded` is README's run command: no --model, no network, the demo model in assets/."""
    command = kimi_desk_command()
    assert command, "the kimi-desk command is not installed (pip install -e .)"
    home = tmp_path / "home"
    save_settings(SETTINGS, home / "settings.toml")
    folder = make_folder(tmp_path / "repo", n_files=4)
    # A private tmux server, so that the test never touches the user's own sessions.
    tmux = ["tmux", "-L", f"kimi-desk-test-{uuid.uuid4().hex[:8]}"]
    env = (
        f"env KIMI_DESK_HOME={shlex.quote(str(home))} HOME={shlex.quote(str(tmp_path))} TERM=xterm-256color "
        f"HF_HUB_OFFLINE=1"
    )
    model_option = f"--model {shlex.quote(str(chat_checkpoint))} " if model == "checkpoint" else ""
    program = (
        f"{env} {shlex.quote(command)} open {shlex.quote(str(folder))} "
        f"{model_option}--device cpu; echo kimi-desk exited with $?; sleep 60"
    )

    def screen() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p", "-t", "smoke"], capture_output=True, text=True).stdout

    def wait_for_text(pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, screen())
            if found:
                return found
            time.sleep(0.2)
        raise AssertionError(f"{pattern!r} never appeared; the terminal shows:\n{screen()}")

    subprocess.run([*tmux, "new-session", "-d", "-s", "smoke", "-x", "100", "-y", "30", program], check=True)
    try:
        wait_for_text(r"Ask about repo", timeout=120)
        subprocess.run([*tmux, "send-keys", "-t", "smoke", "-l", QUESTION], check=True)
        subprocess.run([*tmux, "send-keys", "-t", "smoke", "Enter"], check=True)
        meta = wait_for_text(ANSWER_META.pattern, timeout=120)
        shown = screen()
        assert f"› {QUESTION}" in shown
        assert int(meta.group(1)) > 0
        # The answer area: the lines between the question and the line that closes the answer.
        lines = shown.splitlines()
        asked = next(i for i, line in enumerate(lines) if QUESTION in line)
        closing = next(i for i, line in enumerate(lines) if ANSWER_META.search(line))
        assert asked < closing
        subprocess.run([*tmux, "send-keys", "-t", "smoke", "C-q"], check=True)
        # The program ends on its own, with status 0: the shell around it prints the status.
        exit_line = wait_for_text(r"kimi-desk exited with (\d+)", timeout=20)
        assert exit_line.group(1) == "0", screen()
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
