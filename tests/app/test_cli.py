"""The command line as a user meets it: --version, --help, one-line errors with exit code 2."""

import subprocess
import sys

import pytest

from kimi_desk import __version__


def kimi_desk(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "kimi_desk.app.cli", *args], capture_output=True, text=True,
                          **kwargs)


def test_version_and_help():
    result = kimi_desk("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"kimi-desk {__version__}"
    result = kimi_desk("--help")
    assert result.returncode == 0 and "bench" in result.stdout
    for sub in (["bench", "--help"], ["bench", "cpu", "--help"]):
        result = kimi_desk(*sub)
        assert result.returncode == 0, sub
        assert "usage: kimi-desk" in result.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["bench"], "'bench' needs a subcommand"),
        (["bench", "cpu", "--tokens", "many"], "--tokens must be comma-separated integers"),
        (["bench", "cpu", "--tokens", "0"], "--tokens needs at least one positive length"),
        (["bench", "cpu", "--decode-tokens", "x"], "invalid int value"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = kimi_desk(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_bench_cpu_runs_small(tmp_path):
    result = kimi_desk("bench", "cpu", "--tokens", "64", "--decode-tokens", "2", "--json", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr
    assert "| 64 |" in result.stdout
    import json

    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert rows[0]["ours"]["prefill_tok_s"] > 0 and rows[0]["baseline"]["decode_tok_s"] > 0
