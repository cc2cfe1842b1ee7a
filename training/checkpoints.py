"""Where checkpoints live in a run directory (`<storage_path>/<run.name>/checkpoint_<step>`)."""

from __future__ import annotations

import re
from pathlib import Path

_CHECKPOINT_DIR = re.compile(r"^checkpoint_(\d+)$")


def checkpoint_dir_name(step: int) -> str:
    """Sortable directory name for the checkpoint written after `step` optimizer steps."""
    return f"checkpoint_{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint directories, oldest first (Ray Train's own bookkeeping files excluded)."""
    if not Path(run_dir).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(run_dir).iterdir() if p.is_dir() and (m := _CHECKPOINT_DIR.match(p.name))]
    return [p for _, p in sorted(found)]
