"""The project as a person installs it: a wheel that carries its assets and only kimi_desk, installed
into a fresh virtualenv, whose `kimi-desk --version` and `kimi-desk bench cpu --help` answer."""

import subprocess
import zipfile
from pathlib import Path

from kimi_desk import __version__

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_builds_installs_and_runs(tmp_path):
    result = subprocess.run(
        ["bash", str(ROOT / "packaging" / "build_and_check.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == f"kimi-desk {__version__}"

    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == {"kimi_desk"}
    shipped = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "assets").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    for asset in shipped:
        assert f"kimi_desk/{asset}" in names, f"{asset} is not in the wheel"
    # Every source module, C file and header (compiled at first use), subpackages included (pyproject lists
    # them one by one).
    for folder in ("app", "engine", "kernels"):
        for module in [*(ROOT / folder).rglob("*.py"), *(ROOT / folder).rglob("*.[ch]")]:
            assert f"kimi_desk/{module.relative_to(ROOT).as_posix()}" in names, f"{module} is not in the wheel"
    # The measurements behind `kimi-desk bench` (packaging/bench/ as kimi_desk.bench; its script folders
    # gpu_checks/ and llama_cpp/ are not installed).
    bench = ROOT / "packaging" / "bench"
    for module in [*bench.glob("*.py"), *(bench / "cpu").glob("*.py")]:
        assert f"kimi_desk/bench/{module.relative_to(bench).as_posix()}" in names, f"{module} is not in the wheel"
    assert not [n for n in names if n.startswith(("kimi_desk/bench/gpu_checks/", "kimi_desk/bench/llama_cpp/"))]
    (sdist,) = (tmp_path / "dist").glob("*.tar.gz")
    assert sdist.stat().st_size > 0
