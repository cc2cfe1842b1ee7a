"""Checks that a job's entrypoint command names a real module and an existing config in the working dir.

The same command runs everywhere (laptop, `ray job submit`, a KubeRay RayJob), so a typo in it should be
caught before any cluster is involved.
"""

from __future__ import annotations

import shlex
from pathlib import Path

PYTHON_NAMES = {"python", "python3", "python3.11", "python3.12"}
CONFIG_FLAGS = {"--config", "-c"}


def module_path(root: Path, module: str) -> Path | None:
    """The file that `python -m module` would run from `root`, or None when there is none."""
    base = root.joinpath(*module.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__main__.py").is_file():
        return base / "__main__.py"
    return None


def check_entrypoint(command: str | list[str], root: str | Path) -> list[str]:
    """Problems with a `python -m <module> --config <yaml>` entrypoint relative to `root` (empty: fine).

    Other commands (shell scripts, `serve run ...`) are accepted as they are: only the python -m form is
    ours to check.
    """
    root = Path(root)
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    problems: list[str] = []
    if not argv:
        return ["entrypoint is empty: give the command after `--`, e.g. -- python -m training.pretrain --config configs/pretrain/tiny_cpu.yaml"]
    if Path(argv[0]).name not in PYTHON_NAMES or "-m" not in argv:
        return problems
    i = argv.index("-m")
    if i + 1 >= len(argv):
        return ["entrypoint: `-m` without a module name"]
    module = argv[i + 1]
    if module_path(root, module) is None:
        problems.append(
            f"entrypoint module {module!r} not found under {root} (no {module.replace('.', '/')}.py); "
            "check the module name or run from the repository root (--working-dir)"
        )
    for j, arg in enumerate(argv[i + 2 :], start=i + 2):
        config = None
        if arg in CONFIG_FLAGS and j + 1 < len(argv):
            config = argv[j + 1]
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        if config and not config.startswith(("s3://", "gs://")) and not (root / config).is_file():
            problems.append(f"entrypoint config {config!r} does not exist under {root}; fix the path (it is relative to the working dir)")
    return problems


def config_path(command: str | list[str]) -> str | None:
    """The value of --config in an entrypoint, if any."""
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    for j, arg in enumerate(argv):
        if arg in CONFIG_FLAGS and j + 1 < len(argv):
            return argv[j + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None
