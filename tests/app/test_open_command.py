"""`kimi-desk open` from the command line: its help, the one-line error when there is no model, and a
first screen that paints before torch is imported."""

import subprocess
import sys
import textwrap

from kimi_desk.app import cli


def test_open_help_lists_what_it_opens():
    result = subprocess.run(
        [sys.executable, "-m", "kimi_desk.app.cli", "open", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert "PATH|SESSION_ID|ARCHIVE.zip" in result.stdout and "--device {auto,cpu,cuda}" in result.stdout


def test_no_model_anywhere_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    from kimi_desk.engine import loading

    monkeypatch.setenv("KIMI_DESK_HOME", str(tmp_path))
    monkeypatch.setattr(loading, "DEMO_MODEL", tmp_path / "no-demo-model")
    assert cli.main(["open", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "kimi-desk: error: no model: pass --model PATH (a folder with config.json, *.safetensors and tokenizer.json)"
    ]


def test_bad_device_is_one_line(capsys):
    assert cli.main(["open", ".", "--device", "tpu"]) == 2
    assert "invalid choice: 'tpu'" in capsys.readouterr().err


FIRST_PAINT = textwrap.dedent(
    """
    import asyncio, sys
    from kimi_desk.app.screens import SessionsScreen
    from kimi_desk.app.tui import create_app

    painted = []
    mount = SessionsScreen.on_mount
    def on_mount(self):
        mount(self)
        self.call_after_refresh(lambda: painted.append(("torch" in sys.modules, "triton" in sys.modules)))
    SessionsScreen.on_mount = on_mount

    async def main():
        # The real factories: the engine (and torch) load in a worker after the first paint.
        async with create_app(None, model=sys.argv[1], device="cpu").run_test(size=(80, 24)) as pilot:
            while not painted:
                await pilot.pause(0.01)
    asyncio.run(main())
    print(*painted[0])
    """
)


def test_the_first_screen_paints_before_torch_is_imported(tmp_path):
    """What keeps the first paint instant (importing torch takes seconds): nothing the first screen
    needs imports torch or triton; the engine loads them in a worker after the paint. Asserted directly,
    not timed, so a busy machine cannot fail it."""
    env = {"KIMI_DESK_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", FIRST_PAINT, str(tmp_path / "no-model")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.split()
    assert out == ["False", "False"], f"torch, triton imported before the first paint: {out}"
