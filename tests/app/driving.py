"""Driving the app in tests: run a scenario against a headless terminal, and wait on the UI without
fixed sleeps. No pytest-asyncio: each test runs its scenario with asyncio.run, which is all Textual's
pilot needs."""

from __future__ import annotations

import asyncio
import datetime
import io
import itertools
import os
import time
from pathlib import Path

from rich.console import Console

FROZEN_NOW = datetime.datetime(2026, 11, 27, 12, 5, tzinfo=datetime.timezone.utc)


def freeze_session_ids(monkeypatch):
    """Session ids 00000001, 00000002, ... instead of random ones, for screens that show them."""
    from kimi_desk.engine import session as session_module

    counter = itertools.count(1)
    monkeypatch.setattr(session_module.secrets, "token_hex", lambda n: f"{next(counter):0{2 * n}d}")


def make_test_app(target=None, *, engine, settings=None, **options):
    """The app as the command line builds it, on `engine` (a fake unless a test says otherwise), with
    default settings, a frozen clock, and its settings file in $KIMI_DESK_HOME."""
    from kimi_desk.app.settings import Settings
    from kimi_desk.app.tui import create_app

    options.setdefault("engine_factory", lambda model, device: engine)
    return create_app(
        None if target is None else str(target),
        model="fake-model",
        device="cpu",
        settings=settings or Settings(),
        settings_file=Path(os.environ["KIMI_DESK_HOME"]) / "settings.toml",
        clock=lambda: FROZEN_NOW,
        **options,
    )


def drive(app, scenario, size=(80, 24), message_hook=None):
    """Run `scenario(pilot)` against `app` in a headless terminal of `size`."""

    async def main():
        async with app.run_test(size=size, message_hook=message_hook) as pilot:
            await scenario(pilot)

    asyncio.run(main())


async def wait_for(pilot, condition, timeout: float = 10.0, what: str = "condition"):
    """Let the app run until `condition()` holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; screen is {pilot.app.screen!r}")
        await pilot.pause(0.02)


async def wait_for_screen(pilot, name: str, timeout: float = 10.0):
    await wait_for(pilot, lambda: type(pilot.app.screen).__name__ == name, timeout, f"the {name}")
    await pilot.pause()
    return pilot.app.screen


async def wait_for_answer(pilot, timeout: float = 10.0):
    screen = pilot.app.screen
    await wait_for(pilot, lambda: not screen.generating and screen._answering is None, timeout, "the answer")
    await pilot.pause()


async def wait_in_thread(event, timeout: float = 10.0):
    """Wait for a threading.Event without blocking the app's event loop."""
    assert await asyncio.get_running_loop().run_in_executor(None, event.wait, timeout), "event never set"


def screen_text(app) -> str:
    """What the terminal shows now, as plain text (the same rendering as export_screenshot)."""
    width, height = app.size
    console = Console(
        width=width,
        height=height,
        file=io.StringIO(),
        force_terminal=True,
        record=True,
        color_system="truecolor",
        legacy_windows=False,
        safe_box=False,
    )
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text()
