"""The layering app -> engine -> kernels, one way (README's layout); the core never imports textual, and
the kernels import on a machine without CUDA."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(folder: Path):
    for path in folder.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield path, alias.name
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                yield path, node.module


def test_engine_and_kernels_never_import_textual_or_the_app():
    for folder, forbidden in [("engine", ("textual", "kimi_desk.app")),
                              ("kernels", ("textual", "kimi_desk.app", "kimi_desk.engine"))]:
        for path, module in imported_modules(ROOT / folder):
            assert not module.startswith(forbidden), f"{path.relative_to(ROOT)} imports {module}"


def test_test_oracles_are_not_runtime_imports():
    oracles = ("fla", "transformers", "tiktoken")
    for folder in ("app", "engine", "kernels"):
        for path, module in imported_modules(ROOT / folder):
            # Benchmarks load their baselines (transformers, fla) on request only, inside a function.
            if path.name.startswith("bench"):
                continue
            assert module.split(".")[0] not in oracles, f"{path.relative_to(ROOT)} imports {module}"


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
            assert not Path(result.stdout.strip()).is_relative_to(repo / name), f"our '{name}' folder is a top-level module"
