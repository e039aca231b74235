"""The architecture holds, checked by tools: import-linter's contracts (pyproject.toml), and an
AST scan for what import-linter cannot see (submodules of external packages, imports hidden in
functions, file sizes). Each check is shown rejecting a planted violation."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("worker", "communication", "coordinator", "zerop2p")
MAX_LINES = 300


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(root), "PATH": ""})


def copy_tree(dst: Path) -> Path:
    for name in PACKAGES:
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    return dst


@pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (pip install -e .[dev])")
def test_import_contracts_hold_and_reject_an_upward_import_and_a_circle(tmp_path):
    run = lint(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout
    bad = copy_tree(tmp_path)
    with open(bad / "worker" / "engine" / "unit.py", "a") as fh:
        fh.write("import worker.train.trainer  # planted: the engine reaching up\n")
    with open(bad / "worker" / "state" / "files.py", "a") as fh:
        fh.write("import worker.state.rescue  # planted: a circle inside state/\n")
    run = lint(bad)
    assert run.returncode != 0
    assert "worker.engine.unit -> worker.train.trainer" in run.stdout, run.stdout
    assert ".files -> .rescue" in run.stdout, run.stdout


def function_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import inside a function whose line has no ``# lazy:`` reason."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, (ast.Import, ast.ImportFrom)):
                if "# lazy:" not in lines[inner.lineno - 1]:
                    module = getattr(inner, "module", None) or inner.names[0].name
                    found.append((inner.lineno, module))
    return found


def distributed_imports(source: str) -> list[int]:
    """Lines importing torch.distributed in any spelling."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and any(a.name.startswith("torch.distributed")
                                                for a in node.names):
            out.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and (
                (node.module or "").startswith("torch.distributed")
                or (node.module == "torch" and any(a.name == "distributed" for a in node.names))):
            out.append(node.lineno)
    return out


def python_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_no_import_hides_in_a_function_without_a_reason():
    """A function-level import must say why (``# lazy: ...``: a heavy optional dependency kept
    off the command line's start-up); one that only dodged a circle has no such reason."""
    assert function_imports("def f():\n    import json\n") == [(2, "json")]  # the check bites
    assert function_imports("def f():\n    import json  # lazy: costs\n") == []
    offenders = {str(p.relative_to(ROOT)): found for p in python_files("worker")
                 if (found := function_imports(p.read_text()))}
    assert offenders == {}


def test_the_engine_never_imports_torch_distributed():
    assert distributed_imports("from torch import distributed as dist\n") == [1]
    assert distributed_imports("import torch.distributed\n") == [1]
    for path in python_files("worker/engine"):
        assert distributed_imports(path.read_text()) == [], path


def test_no_file_in_worker_is_over_300_lines():
    sizes = {str(p.relative_to(ROOT)): n for p in python_files("worker")
             if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert sizes == {}, f"split these by concept: {sizes}"


def test_every_worker_subpackage_says_what_lives_there():
    for init in (ROOT / "worker").glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "import" in doc, f"{init} must say what lives there and what it may import"
