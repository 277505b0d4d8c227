"""The layering app -> engine -> kernels, one way (README's layout); the core never imports textual, and
the kernels import on a machine without CUDA. The measurements (kimi_desk.bench, packaging/bench/) stand
apart: they may import the product, the product never imports them but for `kimi-desk bench`'s entry
points in app/cli.py, inside a function."""

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(folder: Path):
    for path in folder.rglob("*.py"):
        yield from imported_modules_of(path)


def imported_modules_of(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield path, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield path, node.module
            for alias in node.names:  # `from kimi_desk import bench` names a module too
                yield path, f"{node.module}.{alias.name}"


def test_engine_and_kernels_never_import_textual_or_the_app():
    for folder, forbidden in [
        ("engine", ("textual", "kimi_desk.app")),
        ("kernels", ("textual", "kimi_desk.app", "kimi_desk.engine")),
    ]:
        for path, module in imported_modules(ROOT / folder):
            assert not module.startswith(forbidden), f"{path.relative_to(ROOT)} imports {module}"


def test_test_oracles_are_not_runtime_imports():
    oracles = ("fla", "transformers", "tiktoken")
    for folder in ("app", "engine", "kernels"):
        for path, module in imported_modules(ROOT / folder):
            assert module.split(".")[0] not in oracles, f"{path.relative_to(ROOT)} imports {module}"


PRODUCT = ("app", "engine", "kernels", "assets", "packaging/kimi_desk")
BENCH_ENTRY = ROOT / "app" / "cli.py"


def _is_bench(module: str) -> bool:
    return module == "kimi_desk.bench" or module.startswith("kimi_desk.bench.")


def test_the_product_never_imports_the_measurements():
    """No product module imports kimi_desk.bench, by an import statement or by name (importlib,
    `python -m`), except app/cli.py, the `bench` command's entry points."""
    for folder in PRODUCT:
        for path in (ROOT / folder).rglob("*.py"):
            if path == BENCH_ENTRY:
                continue
            for _, module in imported_modules_of(path):
                assert not _is_bench(module), f"{path.relative_to(ROOT)} imports {module}"
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    assert not _is_bench(node.value), f"{path.relative_to(ROOT)} names {node.value}"


def test_the_bench_entry_points_import_the_measurements_lazily():
    """app/cli.py imports kimi_desk.bench inside functions only, and `kimi-desk --help` or any other
    command's parser leaves it unimported; `bench` brings it in."""
    tree = ast.parse(BENCH_ENTRY.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            )
            assert not any(_is_bench(n) for n in names), f"app/cli.py imports {names} at module level"
    code = (
        "import sys\n"
        "from kimi_desk.app import cli\n"
        "cli.build_parser(['open'])\n"
        "assert not [m for m in sys.modules if m.startswith('kimi_desk.bench')], 'bench imported eagerly'\n"
        "cli.build_parser(['bench'])\n"
        "assert 'kimi_desk.bench.cpu' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_imports_without_cuda_or_textual():
    code = (
        "import sys; sys.modules['textual'] = None\n"
        "import kimi_desk.kernels, kimi_desk.kernels.kda, kimi_desk.kernels.mla\n"
        "import kimi_desk.engine.model, kimi_desk.engine.weights\n"
        "import torch; assert not torch.cuda.is_available()\n"
        "assert 'triton' not in sys.modules, 'triton imported eagerly'\n"
    )
    env = {"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_no_top_level_app_engine_or_kernels_module():
    """The install maps the folders into kimi_desk.*: none of ours is importable as a top-level `app`,
    `engine` or `kernels` (another project's package of that name may be: transformers brings one
    called `kernels`)."""
    repo = Path(__file__).resolve().parents[1]
    for name in ("app", "engine", "kernels"):
        code = f"import {name}, pathlib; print(pathlib.Path({name}.__file__).resolve())"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
        if result.returncode == 0:
            assert not Path(result.stdout.strip()).is_relative_to(repo / name), (
                f"our '{name}' folder is a top-level module"
            )


def test_environment_variables_are_read_in_one_module():
    """Only kimi_desk.environment reads the environment (os.environ.get, os.getenv, os.environ[...] read);
    README's table names every variable it reads."""
    readers = re.compile(r"os\.environ\.get\(|os\.getenv\(|environ\[[^\]]+\](?!\s*=)")
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("app", "engine", "kernels")
        for path in (ROOT / folder).rglob("*.py")
        if readers.search(path.read_text(encoding="utf-8"))
    ]
    assert not offenders, offenders
    source = (ROOT / "packaging" / "kimi_desk" / "environment.py").read_text(encoding="utf-8")
    names = set(re.findall(r'"((?:KIMI_DESK|TRITON|HF_HUB)_[A-Z_]+)"', source))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert names and all(f"`{name}" in readme for name in names), sorted(n for n in names if f"`{n}" not in readme)
