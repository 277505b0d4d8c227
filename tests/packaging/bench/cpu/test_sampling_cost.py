"""packaging/bench/cpu/sampling_cost.py, cut to one spread and one top-p: it checks the three choices agree
and reports their times and how many weights the PyTorch form sorted."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[4] / "packaging" / "bench" / "cpu" / "sampling_cost.py"


def test_one_spread(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("sampling_cost", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "SPREADS", (5.0,))
    monkeypatch.setattr(bench, "TOP_P", (0.9,))
    report = tmp_path / "sampling.json"
    assert bench.main(["--json", str(report)]) == 0
    result = json.loads(report.read_text())
    (row,) = result["rows"]
    assert result["greedy"]["argmax_ms"] > 0 and result["greedy"]["ours_ms"] > 0
    assert 0 < row["sorted"] < bench.V and row["whole_ms"] > 0 and row["torch_ms"] > 0 and row["ours_ms"] > 0
    assert "| 5.0 | 0.9 |" in capsys.readouterr().out
