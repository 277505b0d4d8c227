"""SVG snapshots of every screen at 80x24 and 120x40, compared with the files in snapshots/.

What changes from run to run is frozen: the clock, session ids, sizes on disk (they depend on the
temporary folder's path), the fake engine's timings, the cursor's blink, and toasts. After a deliberate
change of the UI, rewrite the files with

    KIMI_DESK_UPDATE_SNAPSHOTS=1 python -m pytest tests/app/test_snapshots.py

and look at them (any SVG viewer) before committing. On a mismatch the new rendering is written beside
the expected one as NAME.actual.svg (not to be committed), with the first differing lines of text in the
failure message.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
from pathlib import Path

import pytest
from driving import (
    drive,
    freeze_session_ids,
    make_test_app,
    screen_text,
    wait_for,
    wait_for_answer,
    wait_for_screen,
    wait_in_thread,
)
from fake_engine import FakeAssistant, make_folder
from textual.widgets import DataTable, Input

SNAPSHOTS = Path(__file__).parent / "snapshots"
SIZES = [(80, 24), (120, 40)]
QUESTION = "what does helper_2 return?"


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A HOME with folders to open and a template store holding two sessions (one read and asked, one
    stopped part-way), built once for the module; each test gets a copy of the store."""
    root = tmp_path_factory.mktemp("library")
    with pytest.MonkeyPatch.context() as monkeypatch:
        freeze_session_ids(monkeypatch)
        monkeypatch.setenv("HOME", str(root))
        monkeypatch.setenv("KIMI_DESK_HOME", str(root / "template"))
        make_folder(root / "repo")

        async def read_and_ask(pilot):
            await wait_for_screen(pilot, "ChatScreen")
            await ask(pilot)
            await wait_for_answer(pilot)

        drive(make_test_app(make_folder(root / "project"), engine=FakeAssistant()), read_and_ask)
        stopping = FakeAssistant(hold_at=200)

        async def stop(pilot):
            await wait_in_thread(stopping.holding)
            await pilot.press("escape")
            await wait_for(pilot, lambda: pilot.app.screen.phase == "stopped", what="the stop")

        drive(make_test_app(make_folder(root / "book", n_files=9), engine=stopping), stop)
    return root


@pytest.fixture
def frozen(library, tmp_path, monkeypatch):
    """HOME is the library (so paths read ~/repo), the store a fresh copy of its template, and what
    would differ between runs (ids, sizes on disk that depend on the temporary path) is fixed."""
    from kimi_desk.engine.session import Session

    freeze_session_ids(monkeypatch)
    monkeypatch.setattr(Session, "nbytes", lambda self: 3_407_872 if self.complete else 1_153_434)
    monkeypatch.setenv("HOME", str(library))
    shutil.copytree(library / "template", tmp_path / "kimi-home")
    monkeypatch.setenv("KIMI_DESK_HOME", str(tmp_path / "kimi-home"))
    return library


async def wait_for_sessions_list(pilot):
    """The list, drawn."""
    screen = await wait_for_screen(pilot, "SessionsScreen")
    await wait_for(pilot, lambda: screen.query_one(DataTable).row_count == 2, what="the list")
    await wait_for(pilot, lambda: "~/project " in screen_text(pilot.app), what="the rows drawn")


async def ask(pilot, question=QUESTION):
    pilot.app.screen.query_one("#question", Input).value = question
    await pilot.press("enter")


async def ask_and_settle(pilot, question=QUESTION):
    """Ask, and wait for the answer, the places it cites, and the transcript scrolled to its end."""
    screen = pilot.app.screen
    await ask(pilot, question)
    await wait_for_answer(pilot)
    await wait_for(pilot, lambda: screen.query("TurnView").last().citations, what="the citations")
    # The streamed Markdown and the citations lay themselves out over a few frames: the snapshot is of
    # the end, settled.
    transcript = screen.query_one("#transcript")

    def at_end():
        transcript.scroll_end(animate=False, immediate=True)
        return transcript.is_vertical_scroll_end

    await wait_for(pilot, at_end, what="the transcript's end")
    await pilot.pause(0.2)
    await wait_for(pilot, at_end, what="the transcript's end, settled")


def app_on(target=None, engine=None, **options):
    return make_test_app(target, engine=engine or FakeAssistant(), **options)


def svg_text(svg: str) -> list[str]:
    """The text lines of a Textual SVG screenshot, for a readable failure message."""
    return [re.sub(r"<[^>]+>", "", line).replace("&#160;", " ") for line in svg.splitlines() if "<text" in line]


async def settle(pilot):
    """Still the things that move: the cursor's blink, toasts, pending layout."""
    app = pilot.app
    for screen in app.screen_stack:
        for field in screen.query(Input):
            field.cursor_blink = False
    app.clear_notifications()
    await pilot.pause(0.05)
    await pilot.wait_for_scheduled_animations()
    await pilot.pause()


def check(app, name: str):
    expected_file = SNAPSHOTS / f"{name}.svg"
    actual = app.export_screenshot()
    if os.environ.get("KIMI_DESK_UPDATE_SNAPSHOTS") or not expected_file.exists():
        SNAPSHOTS.mkdir(exist_ok=True)
        expected_file.write_text(actual, encoding="utf-8")
        if not os.environ.get("KIMI_DESK_UPDATE_SNAPSHOTS"):
            pytest.fail(f"new snapshot {expected_file.name} written: look at it, then commit it")
        return
    expected = expected_file.read_text(encoding="utf-8")
    if actual != expected:
        actual_file = expected_file.with_suffix(".actual.svg")
        actual_file.write_text(actual, encoding="utf-8")
        diff = "\n".join(list(difflib.unified_diff(svg_text(expected), svg_text(actual), lineterm="", n=0))[:40])
        pytest.fail(
            f"{name} differs from {expected_file.name} (now in {actual_file.name}):\n{diff}\n"
            f"screen:\n{screen_text(app)}"
        )


def snapshot(app, name, size, scenario):
    async def run(pilot):
        await scenario(pilot)
        await settle(pilot)
        check(pilot.app, f"{name}_{size[0]}x{size[1]}")

    drive(app, run, size=size)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_reading(frozen, size):
    fake = FakeAssistant(hold_at=160)

    async def scenario(pilot):
        screen = await wait_for_screen(pilot, "ReadingScreen")
        await wait_in_thread(fake.holding)
        await wait_for(pilot, lambda: "160 /" in str(screen.query_one("#tokens-count").render()), what="progress")

    try:
        snapshot(app_on("~/repo", engine=fake), "reading", size, scenario)
    finally:
        fake.release.set()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_reading_failed(frozen, size):
    async def scenario(pilot):
        screen = await wait_for_screen(pilot, "ReadingScreen")
        await wait_for(pilot, lambda: screen.phase == "failed", what="the failure")

    snapshot(app_on("~/missing"), "reading_failed", size, scenario)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_chat(frozen, size):
    async def scenario(pilot):
        await wait_for_screen(pilot, "ChatScreen")
        await ask_and_settle(pilot)

    snapshot(app_on("~/repo"), "chat", size, scenario)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_chat_after_limits_left_files_out(frozen, size):
    from kimi_desk.engine.ingest import LimitNotice

    notices = (
        LimitNotice("max_files", 10_000, 1_204, "1,204 files not read: the limit of 10,000 files was reached"),
        LimitNotice("max_file_bytes", 2 << 20, 3, "3 files not read: larger than the limit of 2.0 MiB per file"),
    )

    async def scenario(pilot):
        await wait_for_screen(pilot, "ChatScreen")

    snapshot(app_on("~/repo", engine=FakeAssistant(limit_notices=notices)), "chat_left_out", size, scenario)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_chat_with_the_embedded_demo_model(frozen, size):
    """What the demo model's answers are worth, and how to get a real model, above the chat."""
    from kimi_desk.app.backend import ModelChoice

    async def scenario(pilot):
        await wait_for_screen(pilot, "ChatScreen")

    app = app_on("~/repo")
    app.model_choice = ModelChoice("/opt/kimi-desk/assets/model", "demo")
    snapshot(app, "chat_demo", size, scenario)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_chat_light_theme(frozen, size):
    from kimi_desk.app.settings import Settings

    async def scenario(pilot):
        await wait_for_screen(pilot, "ChatScreen")
        await ask_and_settle(pilot)

    app = app_on("~/repo", settings=Settings(theme="textual-light"))
    snapshot(app, "chat_light", size, scenario)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_sessions(frozen, size):
    async def scenario(pilot):
        await wait_for_sessions_list(pilot)

    snapshot(app_on(), "sessions", size, scenario)


@pytest.mark.parametrize(
    "dialog,keys", [("rename", ["r"]), ("delete", ["d"]), ("open", ["ctrl+n"]), ("help", ["f1"]), ("settings", ["f3"])]
)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_dialogs_over_sessions(frozen, size, dialog, keys):
    async def scenario(pilot):
        await wait_for_sessions_list(pilot)
        await pilot.press(*keys)
        await wait_for(pilot, lambda: pilot.app.screen.is_modal, what="the dialog")

    snapshot(app_on(), dialog, size, scenario)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_model_failed(frozen, size):
    from kimi_desk.engine.errors import CheckpointError

    def broken(model, device):
        raise CheckpointError(
            "/models/broken: not a folder (a checkpoint is a folder with config.json and *.safetensors)"
        )

    async def scenario(pilot):
        await wait_for_screen(pilot, "ProblemDialog")

    snapshot(app_on("~/repo", engine_factory=broken), "model_failed", size, scenario)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_chat_follow_up_in_a_second_thread(frozen, size):
    """Two threads in the list; the second holds a question and its follow-up."""

    async def scenario(pilot):
        screen = await wait_for_screen(pilot, "ChatScreen")
        await pilot.press("ctrl+t")
        await wait_for(pilot, lambda: screen.thread is None, what="the new thread")
        await ask_and_settle(pilot)
        await ask_and_settle(pilot, "and where is it called?")
        assert len(screen.session.threads) == 2

    snapshot(app_on("~/project"), "chat_thread", size, scenario)


async def open_source_pane(pilot):
    """Ask, then open the first place the answer cites."""
    screen = await wait_for_screen(pilot, "ChatScreen")
    await ask(pilot)
    await wait_for_answer(pilot)
    await wait_for(pilot, lambda: screen.query("TurnView").last().citations, what="the citations")
    await pilot.press("ctrl+o")
    await wait_for(pilot, lambda: screen.query_one("#source-pane").display, what="the source pane")
    return screen


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_source_pane(frozen, size):
    """The cited line of file_2.py as read, highlighted, beside the chat (over it at 80 columns)."""

    async def scenario(pilot):
        await open_source_pane(pilot)
        await pilot.pause(0.1)

    snapshot(app_on("~/repo"), "source", size, scenario)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_source_pane_not_found(frozen, size):
    async def scenario(pilot):
        screen = await open_source_pane(pilot)
        await pilot.press("p")
        last = len(screen.query("TurnView").last().citations) - 1
        await wait_for(pilot, lambda: screen._source and screen._source[1] == last, what="the last citation")
        await pilot.pause(0.1)

    snapshot(app_on("~/repo"), "source_not_found", size, scenario)
