"""packaging/bench/cpu/fits_in_ram.py on a tiny checkpoint with a small ballast: both starts run (the
first writes the int4 cache, the second reads it), the ballast survives, and the report says so."""

import json
import subprocess
import sys
from pathlib import Path

from kimi_desk.bench.random_checkpoint import tiny_config, write_random_checkpoint

SCRIPT = Path(__file__).resolve().parents[4] / "packaging" / "bench" / "cpu" / "fits_in_ram.py"


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemAvailable")


def test_two_starts_under_a_ballast(tmp_path):
    checkpoint = write_random_checkpoint(tiny_config(), tmp_path / "tiny")
    leave_mib = _available_bytes() // (1 << 20) - 64  # a 64 MiB ballast: the mechanism, not a real squeeze
    report = tmp_path / "fit.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(checkpoint), "--available", f"{leave_mib}MiB", "--depths", "0,64"]
        + ["--json", str(report)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    fit = json.loads(report.read_text())
    assert fit["ballast_survived"] and fit["ballast_gib"] > 0
    assert [s["exit"] for s in fit["starts"]] == [0, 0]
    assert fit["cache_gib"] > 0  # the first start wrote the cache beside the checkpoint
    for start in fit["starts"]:
        assert start["peak_anonymous_gib"] > 0 and [d["depth"] for d in start["result"]["decode"]] == [0, 64]


def test_a_size_it_cannot_read_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "--available", "lots"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "a size such as 28GiB" in result.stderr
