"""An entry point started by a Python without raylm's dependencies stops at once, in one line, with the fix.

That is what `ray job submit -- python -m training.pretrain ...` gets on a cluster started from the venv's
`ray` without the venv activated: the job's `python` is the system one. Here the Python without the
packages is this venv's interpreter with `-S -E` (no site-packages, no PYTHONPATH), and the system
Python when the machine has one; both run the real entry modules from the repository root.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.requirements_check import DISTRIBUTIONS, NEEDS, missing_distributions

REPO = Path(__file__).resolve().parents[1]
ENTRY_MODULES = ["training.pretrain", "training.finetune", "training.prune", "training.promote", "training.export", "training.evaluate", "tune.search", "cluster.submit", "cluster.preflight", "cluster.local", "cluster.alerts", "demo.main", "serving.node_env"]
IMPORTED_ENTRIES = ["serving.app"]  # the Serve import path: imported by Ray, not run
NOT_ENTRIES = {"serving.tiny_exports"}  # builds test fixtures; run by the tests' own Python
SYSTEM_PYTHON = Path("/usr/bin/python3")
BARE_PYTHONS = [[sys.executable, "-S", "-E"]] + ([[str(SYSTEM_PYTHON), "-S", "-E"]] if SYSTEM_PYTHON.exists() else [])


def run_bare(python: list[str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*python, *args], capture_output=True, text=True, cwd=REPO, timeout=60, env={"PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("python", BARE_PYTHONS, ids=lambda p: Path(p[0]).name)
@pytest.mark.parametrize("entry", ENTRY_MODULES)
def test_entry_point_without_dependencies_stops_with_one_line(entry, python):
    result = run_bare(python, "-m", entry, "--config", "configs/pretrain/tiny_cpu.yaml")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and result.stdout == "", result.stderr
    (line,) = lines
    needed = NEEDS[entry.split(".")[0]]
    assert line.startswith(f"raylm: python -m {entry} cannot start: {python[0]} lacks {', '.join(needed)} (raylm's dependencies)."), line
    for fix in ("activate the venv on every node", "runtime_env", "k8s/image/Dockerfile"):
        assert fix in line


def test_serving_import_path_fails_with_the_same_line():
    result = run_bare(BARE_PYTHONS[0], "-c", "import serving.app")
    assert result.returncode == 1
    last = result.stderr.splitlines()[-1]
    assert last.startswith("cluster.requirements_check.MissingRequirements: raylm: serving.app cannot be imported: "), last
    assert "lacks torch, ray" in last and "activate the venv on every node" in last


def test_this_venv_has_everything_every_entry_needs():
    for entry in ENTRY_MODULES + IMPORTED_ENTRIES:
        assert missing_distributions(NEEDS[entry.split(".")[0]]) == [], entry


def test_checked_distributions_are_pyprojects_dependencies():
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    declared = {re.split(r"[\[<>=!~ ]", d, maxsplit=1)[0].lower() for d in re.findall(r'"([^"]+)"', block)}
    assert declared == set(DISTRIBUTIONS)


def _stdlib_or_check(node: ast.stmt) -> bool:
    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
    return all(n.split(".")[0] in sys.stdlib_module_names or n in ("__future__", "cluster.requirements_check") for n in names)


@pytest.mark.parametrize("entry", ENTRY_MODULES + IMPORTED_ENTRIES)
def test_entry_checks_before_any_third_party_or_raylm_import(entry):
    tree = ast.parse((REPO / (entry.replace(".", "/") + ".py")).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and getattr(node.value.func, "id", "") == "check_requirements":
            assert node.value.args[0].value == entry
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            assert _stdlib_or_check(node), f"{entry}: line {node.lineno} imports before check_requirements()"
    pytest.fail(f"{entry} never calls check_requirements()")


def test_every_runnable_module_is_an_entry_that_checks():
    runnable = {
        ".".join(p.relative_to(REPO).with_suffix("").parts)
        for package in ("training", "tune", "serving", "cluster", "demo")
        for p in (REPO / package).rglob("*.py")
        if 'if __name__ == "__main__"' in p.read_text(encoding="utf-8") or p.name == "__main__.py"
    }
    assert runnable - NOT_ENTRIES == set(ENTRY_MODULES), "a new entry point: add check_requirements() and list it here"
