"""Stop an entry point at once, in one line, when the Python running it lacks raylm's dependencies.

The common way to get there: `ray job submit -- python -m training.pretrain ...` against a cluster
started from the venv's `ray` while the venv was not activated: the job's `python` is the system one,
which fails minutes later with a traceback about `pyarrow` or `torch`. Every entry point calls
`check_requirements` before its first third-party import.

Standard library only: this module must import where nothing else does.
"""

from __future__ import annotations

import importlib.util
import os
import sys

# pip distribution -> import name, for every dependency in pyproject.toml ([project] dependencies);
# tests/test_cluster_requirements.py keeps the two in step.
DISTRIBUTIONS = {
    "torch": "torch",
    "ray": "ray",
    "transformers": "transformers",
    "tokenizers": "tokenizers",
    "peft": "peft",
    "deepspeed": "deepspeed",
    "pyarrow": "pyarrow",
    "numpy": "numpy",
    "pydantic": "pydantic",
    "pyyaml": "yaml",
    "safetensors": "safetensors",
    "gguf": "gguf",
    "tensorboard": "tensorboard",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "fastapi": "fastapi",
    "httpx": "httpx",
}
# The cluster tools are torch-free: they run on a laptop that has raylm installed without a GPU stack.
CLUSTER_TOOLS = ("pyyaml", "pydantic", "ray")
NEEDS = {"training": tuple(DISTRIBUTIONS), "tune": tuple(DISTRIBUTIONS), "serving": tuple(DISTRIBUTIONS),
         "demo": tuple(DISTRIBUTIONS), "cluster": CLUSTER_TOOLS}
EXIT_MISSING_REQUIREMENTS = 2

FIX = (
    "Fix: run it with the Python that has raylm installed: activate the venv on every node "
    "(`source .venv/bin/activate` before `ray start` and in the job's shell, or call .venv/bin/python), "
    "give the Ray job a runtime_env that installs raylm, or use the image built from k8s/image/Dockerfile."
)


class MissingRequirements(ImportError):
    """Raised instead of exiting when the entry module is imported rather than run."""


def missing_distributions(distributions: tuple[str, ...] | list[str]) -> list[str]:
    """The distributions whose top-level module this interpreter cannot find (nothing is imported)."""
    missing = []
    for name in distributions:
        try:
            found = importlib.util.find_spec(DISTRIBUTIONS[name]) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def requirements_message(entry: str, missing: list[str], run_as_main: bool = True) -> str:
    """One line: what cannot start, which packages this Python lacks, and the fix."""
    what = f"python -m {entry} cannot start" if run_as_main else f"{entry} cannot be imported"
    return (
        f"raylm: {what}: {sys.executable or 'this Python'} lacks "
        f"{', '.join(missing)} (raylm's dependencies). {FIX}"
    )


def check_requirements(entry: str, run_as_main: bool) -> None:
    """Check what `entry` (e.g. 'training.pretrain') needs; exit 2 with one line on stderr when run as
    a script, raise MissingRequirements when imported. RAYLM_SKIP_REQUIREMENTS_CHECK=1 skips it."""
    if os.environ.get("RAYLM_SKIP_REQUIREMENTS_CHECK") == "1":
        return
    missing = missing_distributions(NEEDS[entry.split(".")[0]])
    if not missing:
        return
    message = requirements_message(entry, missing, run_as_main)
    if run_as_main:
        print(message, file=sys.stderr)
        raise SystemExit(EXIT_MISSING_REQUIREMENTS)
    raise MissingRequirements(message)
