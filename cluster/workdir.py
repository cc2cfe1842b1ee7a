"""What a job's `working_dir` upload will contain, measured with Ray's own packaging rules, before it is sent.

Job submission uploads the working dir as one zip over the dashboard's HTTP API, which refuses bodies of
100 MiB or more (`ray_constants.DASHBOARD_CLIENT_MAX_SIZE`). Ray finds out only after zipping and sending;
this module walks the directory with the same excludes (.gitignore, .rayignore, Ray's default excludes and
the job's `excludes`) and names what is large, so the user can exclude it before anything is sent.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# Our own defaults on top of Ray's (.git, .venv, venv, __pycache__): run outputs and caches never belong
# in an upload, even when a project forgot to gitignore them.
RAYLM_DEFAULT_EXCLUDES = ["runs/", ".pytest_cache/", "*.egg-info/", ".mypy_cache/", ".ruff_cache/"]


def upload_cap_bytes() -> int:
    """The largest working_dir zip the job server accepts."""
    from ray._private import ray_constants

    return ray_constants.DASHBOARD_CLIENT_MAX_SIZE


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


@dataclass
class WorkingDirReport:
    """Files a working_dir upload would contain, and the biggest of them."""

    root: Path
    total_bytes: int = 0
    file_count: int = 0
    zip_bytes: int | None = None  # measured only when the raw total is near or over the cap
    largest_files: list[tuple[str, int]] = field(default_factory=list)
    largest_dirs: list[tuple[str, int]] = field(default_factory=list)

    @property
    def upload_bytes(self) -> int:
        return self.zip_bytes if self.zip_bytes is not None else self.total_bytes

    def too_large(self, cap: int | None = None) -> bool:
        return self.upload_bytes >= (cap or upload_cap_bytes())

    def problem_and_fix(self, cap: int | None = None) -> tuple[str, str] | None:
        """None when the upload fits; else (what is too large, how to fix it)."""
        cap = cap or upload_cap_bytes()
        if not self.too_large(cap):
            return None
        # Only what matters for the cap: entries of at least 1 MiB (else the few biggest of the small ones).
        entries = self.largest_dirs[:5] + self.largest_files[:5]
        big = ", ".join(f"{p} ({_mib(b)})" for p, b in ([e for e in entries if e[1] >= 2**20] or entries[:3]))
        return (
            f"working_dir {self.root}: the upload would be {_mib(self.upload_bytes)} ({self.file_count} files), "
            f"at or over the job server's {_mib(cap)} cap. Largest: {big}",
            "exclude them (--exclude PATTERN, or list them in .rayignore/.gitignore), or put data and checkpoints "
            "on shared storage (s3://, gs://, NFS) and pass the path in the config",
        )

    def problem(self, cap: int | None = None) -> str | None:
        """None when the upload fits; else one message naming what is large and how to exclude it."""
        found = self.problem_and_fix(cap)
        return f"{found[0]}. Fix: {found[1]}" if found else None


def measure_working_dir(path: str | Path, excludes: list[str] | None = None, top: int = 10) -> WorkingDirReport:
    """Walk `path` exactly as Ray packages a working_dir and report the sizes.

    The raw byte total is an upper bound of the zip for all but pathological inputs; only when it reaches
    the cap is the directory actually zipped (with Ray's packer) to get the exact upload size.
    """
    from ray._private import ray_constants
    from ray._private.runtime_env import packaging

    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise NotADirectoryError(f"working_dir {str(root)!r} is not a directory")
    all_excludes = ray_constants.get_runtime_env_default_excludes() + RAYLM_DEFAULT_EXCLUDES + list(excludes or [])
    include_gitignore = os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"

    report = WorkingDirReport(root=root)
    files: list[tuple[str, int]] = []
    per_top_dir: dict[str, int] = {}

    def visit(p: Path) -> None:
        if p.is_file():
            size = p.stat().st_size
            rel = p.relative_to(root)
            files.append((str(rel), size))
            if len(rel.parts) > 1:
                per_top_dir[rel.parts[0] + "/"] = per_top_dir.get(rel.parts[0] + "/", 0) + size

    packaging._dir_travel(
        root, [packaging._get_excludes(root, all_excludes)], visit, include_gitignore=include_gitignore, logger=_quiet_logger()
    )
    report.file_count = len(files)
    report.total_bytes = sum(size for _, size in files)
    report.largest_files = sorted(files, key=lambda f: -f[1])[:top]
    report.largest_dirs = sorted(per_top_dir.items(), key=lambda d: -d[1])[:top]
    if report.total_bytes >= upload_cap_bytes():
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "working_dir.zip"
            packaging._zip_files(str(root), all_excludes, str(out), include_gitignore=include_gitignore, logger=_quiet_logger())
            report.zip_bytes = out.stat().st_size
    return report


def effective_excludes(excludes: list[str] | None) -> list[str]:
    """The excludes to pass in runtime_env: raylm's defaults plus the user's (Ray adds its own itself)."""
    return RAYLM_DEFAULT_EXCLUDES + [e for e in (excludes or []) if e not in RAYLM_DEFAULT_EXCLUDES]


def _quiet_logger():
    import logging

    logger = logging.getLogger("raylm.workdir")
    logger.setLevel(logging.ERROR)
    return logger
