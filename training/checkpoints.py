"""Where checkpoints live in a run directory (`<storage_path>/<run.name>/checkpoint_<step>`), and
which of them are complete.

A checkpoint is complete when its manifest verifies: `raylm_manifest.json`, written last (to a
temporary name, then renamed), lists the size and sha256 of every file the checkpoint holds. A
node that dies while the shards are being written leaves a directory without a manifest, or with
files that do not match it; such a directory is never chosen for resume, export or conversion.
This matters beyond bookkeeping: DeepSpeed's loader unpickles its shards, so a file that does
not verify is never handed to it. Imports without torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

_CHECKPOINT_DIR = re.compile(r"^checkpoint_(\d+)$")
MANIFEST = "raylm_manifest.json"
MANIFEST_FORMAT = "raylm-checkpoint-manifest"
UNIVERSAL_DIR = "universal"  # DeepSpeed universal copy kept beside the shards (training.universal)


def checkpoint_dir_name(step: int) -> str:
    """Sortable directory name for the checkpoint written after `step` optimizer steps."""
    return f"checkpoint_{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint directories, complete or not, oldest first (Ray Train's files excluded)."""
    if not Path(run_dir).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(run_dir).iterdir() if p.is_dir() and (m := _CHECKPOINT_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _payload_files(directory: Path, skip_dirs: tuple[str, ...]) -> list[Path]:
    """Every regular file under `directory` (sorted, relative), the manifest and `skip_dirs` excluded."""
    files = []
    for root, dirs, names in os.walk(directory):
        rel_root = Path(root).relative_to(directory)
        if rel_root == Path("."):
            dirs[:] = [d for d in dirs if d not in skip_dirs and not d.startswith(".")]
        files += [rel_root / n for n in names if not (rel_root == Path(".") and n == MANIFEST)]
    return sorted(files)


def write_manifest(directory: Path, info: dict | None = None, skip_dirs: tuple[str, ...] = (UNIVERSAL_DIR,)) -> Path:
    """Record size and sha256 of every file under `directory`; call it after everything else is written.

    `info` (step, world size, ZeRO stage, ...) is stored alongside. The manifest appears atomically
    (temporary name, then rename), so a reader sees either no manifest or a whole one.
    """
    directory = Path(directory)
    entries = {str(rel): {"size": (directory / rel).stat().st_size, "sha256": _sha256(directory / rel)}
               for rel in _payload_files(directory, skip_dirs)}
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "info": info or {}, "files": entries}
    tmp = directory / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, directory / MANIFEST)
    return directory / MANIFEST


def manifest_problem(directory: Path) -> str | None:
    """Why `directory` is not a complete checkpoint, or None when every listed file verifies."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        return f"no {MANIFEST} (written last: the checkpoint was never finished)"
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict) or not files:
            return f"{MANIFEST} is not a raylm checkpoint manifest"
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is not valid JSON"
    for rel, want in sorted(files.items()):
        file = directory / rel
        if not file.is_file():
            return f"{rel} is missing"
        if file.stat().st_size != want["size"]:
            return f"{rel} has {file.stat().st_size} bytes, the manifest says {want['size']}"
    for rel, want in sorted(files.items()):  # sizes first: a cheap check catches truncation
        if _sha256(directory / rel) != want["sha256"]:
            return f"{rel} does not match its sha256 in the manifest"
    return None


def manifest_info(directory: Path) -> dict:
    """The `info` a verified manifest carries (step, world_size, zero_stage, ...)."""
    return json.loads((Path(directory) / MANIFEST).read_text()).get("info", {})


def scan_checkpoints(run_dir: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(complete checkpoints oldest first, [(incomplete checkpoint, why)])."""
    complete, skipped = [], []
    for ckpt in list_checkpoints(run_dir):
        problem = manifest_problem(ckpt)
        if problem:
            skipped.append((ckpt, problem))
        else:
            complete.append(ckpt)
    return complete, skipped


def latest_complete_checkpoint(run_dir: Path, warn=None) -> Path | None:
    """The newest checkpoint whose manifest verifies; each newer, incomplete one is reported to `warn`."""
    complete, skipped = scan_checkpoints(run_dir)
    latest = complete[-1] if complete else None
    for ckpt, why in skipped:
        if warn and (latest is None or ckpt.name > latest.name):
            warn(f"[raylm] warning: skipping incomplete checkpoint {ckpt}: {why}")
    return latest
