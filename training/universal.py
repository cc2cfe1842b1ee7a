"""Resume a ZeRO checkpoint on a different number of workers, through DeepSpeed's universal format.

ZeRO 1-3 shards hold each rank's slice of the flat fp32 weights and optimizer state; they only
load at the world size that wrote them. DeepSpeed 0.19.8 ships the converter
(`deepspeed/checkpoint/ds_to_universal.py`) to a per-parameter layout that loads at any world size
with `{"checkpoint": {"load_universal": true}}`. raylm converts a checkpoint once, on rank 0, into
`<checkpoint>/universal/` (written under a temporary name, given its own manifest, then renamed:
a half-converted copy is never used), and every later resize reuses it.

ZeRO stage 0 needs no conversion: its `mp_rank_00_model_states.pt` holds the whole module and the
whole optimizer state (written by rank 0 alone), and every rank loads that file at any world size.

The global batch stays what the checkpoint trained with: gradient accumulation absorbs the new
world size (`accumulation_for`), and the data order is a pure function of the prepared Parquet
(`training.loop.global_batches`), so the loss trajectory continues. Imports without torch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from argparse import Namespace
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

from training.checkpoints import (
    UNIVERSAL_DIR,
    latest_complete_checkpoint,
    manifest_info,
    manifest_problem,
    write_manifest,
)

DS_TAG = "ds"  # fixed DeepSpeed checkpoint tag: one checkpoint per directory


def accumulation_for(global_batch_rows: int, micro_batch_size: int, world_size: int) -> int:
    """Gradient accumulation steps that keep `global_batch_rows` at `world_size` workers."""
    per_step = micro_batch_size * world_size
    if global_batch_rows % per_step:
        fits = [w for w in range(1, global_batch_rows // micro_batch_size + 1)
                if global_batch_rows % (micro_batch_size * w) == 0]
        raise ValueError(
            f"the global batch of {global_batch_rows} rows does not split into {world_size} workers x "
            f"optim.micro_batch_size={micro_batch_size} x whole accumulation steps; run on one of {fits} "
            f"workers, or set optim.micro_batch_size so that {world_size} x it divides {global_batch_rows}"
        )
    return global_batch_rows // per_step


@dataclass
class ResumePlan:
    """How this world size loads a given checkpoint."""

    checkpoint: Path
    saved_state: dict  # trainer_state.json of the checkpoint
    saved_world_size: int
    zero_stage: int
    global_batch_rows: int
    grad_accum_steps: int  # at the new world size
    load_universal: bool
    conversion_s: float = 0.0  # seconds spent converting to the universal copy (0 when reused or not needed)

    @property
    def load_dir(self) -> Path:
        """The directory to hand to `engine.load_checkpoint(load_dir, tag=DS_TAG)`."""
        return self.checkpoint / UNIVERSAL_DIR if self.load_universal else self.checkpoint


def plan_resume(checkpoint: Path, world_size: int, micro_batch_size: int, zero_stage: int) -> ResumePlan:
    """Decide, before the engine is built, whether this resume goes through the universal copy.

    Raises ValueError (with the fix) when the checkpoint is incomplete, its ZeRO stage differs
    from the run's, or its global batch cannot be kept at `world_size`.
    """
    checkpoint = Path(checkpoint)
    problem = manifest_problem(checkpoint)
    if problem:
        raise ValueError(f"{checkpoint}: incomplete checkpoint ({problem}); it is never resumed")
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    info = manifest_info(checkpoint)
    saved_world = int(info.get("world_size", state.get("world_size", world_size)))
    saved_stage = int(info.get("zero_stage", zero_stage))
    if saved_stage != zero_stage:
        # Universal checkpoints could bridge stages 1<->2<->3, but a changed stage also changes what a
        # run promises (memory per rank), and 0<->ZeRO uses different files: keep it an explicit choice.
        raise ValueError(
            f"{checkpoint}: written with deepspeed.zero_stage={saved_stage}, this run uses {zero_stage}; "
            f"set deepspeed.zero_stage: {saved_stage} to resume it, or pick a new run.name"
        )
    global_blocks = int(state.get("global_batch_rows") or info.get("global_batch_rows")
                        or micro_batch_size * saved_world)
    gas = accumulation_for(global_blocks, micro_batch_size, world_size)
    return ResumePlan(checkpoint, state, saved_world, saved_stage, global_blocks, gas,
                      load_universal=saved_world != world_size and saved_stage >= 1)


def universal_copy(checkpoint: Path) -> Path | None:
    """The checkpoint's converted universal copy, when one exists and its manifest verifies."""
    target = Path(checkpoint) / UNIVERSAL_DIR
    return target if target.is_dir() and manifest_problem(target) is None else None


def convert_to_universal(checkpoint: Path, tag: str = DS_TAG) -> tuple[Path, float]:
    """Convert a complete ZeRO 1-3 checkpoint to `<checkpoint>/universal` once; (its path, seconds spent).

    Runs DeepSpeed's own converter in this process (one extract/merge worker: Ray workers should not
    fork pools) with `inject_missing_state` (plain HF modules carry no universal-checkpoint info), its
    chatter going to `universal/conversion.log`. Only a checkpoint whose manifest verifies is converted.
    """
    checkpoint = Path(checkpoint)
    existing = universal_copy(checkpoint)
    if existing:
        return existing, 0.0
    problem = manifest_problem(checkpoint)
    if problem:
        raise ValueError(f"{checkpoint}: incomplete checkpoint ({problem}); it is never converted")
    if int(manifest_info(checkpoint).get("zero_stage", 1)) == 0:
        raise ValueError(f"{checkpoint}: ZeRO stage 0 holds whole states and loads at any world size; "
                         "there is nothing to convert")

    from deepspeed.checkpoint import ds_to_universal

    started = time.perf_counter()
    target = checkpoint / UNIVERSAL_DIR
    tmp = Path(tempfile.mkdtemp(prefix=f".{UNIVERSAL_DIR}-tmp-", dir=checkpoint))
    try:
        args = Namespace(input_folder=str(checkpoint / tag), output_folder=str(tmp / tag), num_extract_workers=1,
                         num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        with open(tmp / "conversion.log", "w") as log, redirect_stdout(log), redirect_stderr(log):
            ds_to_universal.main(args)  # also writes tmp/latest_universal naming the tag
        write_manifest(tmp, info={"converted_from": checkpoint.name, **manifest_info(checkpoint)}, skip_dirs=())
        if target.exists():  # a stale copy that does not verify (universal_copy said so above)
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target, time.perf_counter() - started


def prepare_resume(run_dir: Path, world_size: int, micro_batch_size: int, zero_stage: int, rank: int, dist,
                   log=print, reported: str | None = None) -> ResumePlan | None:
    """On every rank, before the engine is built: the plan for resuming the run's latest complete checkpoint.

    `reported` is the checkpoint Ray Train hands the worker group (`ray.train.get_checkpoint()`: the
    run's latest report, or one Tune put there); it wins when complete, else the newest complete
    checkpoint in `run_dir` does. Rank 0 alone verifies the manifests (sha256 of every file), picks
    the checkpoint, converts it to the universal copy when the world size changed, and broadcasts
    the plan, or its error, so every rank raises the same error instead of hanging in a collective.
    None: nothing to resume.
    """
    outcome: list = [None]
    if rank == 0:
        try:
            if reported and manifest_problem(Path(reported)) is None:
                latest = Path(reported)
            else:
                latest = latest_complete_checkpoint(Path(run_dir), warn=log)
            plan = plan_resume(latest, world_size, micro_batch_size, zero_stage) if latest else None
            if plan is not None and plan.load_universal:
                _, plan.conversion_s = convert_to_universal(plan.checkpoint)
                log(f"[raylm] {plan.checkpoint.name} was written by {plan.saved_world_size} worker(s), this run has "
                    f"{world_size}: loading its universal copy ({plan.checkpoint / UNIVERSAL_DIR}"
                    + (f", converted in {plan.conversion_s:.1f} s)" if plan.conversion_s else ", converted earlier)"))
            if plan is not None and plan.saved_world_size != world_size:
                log(f"[raylm] global batch kept at {plan.global_batch_rows} rows: gradient accumulation "
                    f"{plan.grad_accum_steps} x micro-batch {micro_batch_size} x {world_size} worker(s)")
            outcome = [plan]
        except Exception as err:  # noqa: BLE001 - every rank must learn about it, not only rank 0
            outcome = [f"{type(err).__name__}: {err}"]
    dist.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], str):
        raise RuntimeError(f"cannot resume {run_dir}: {outcome[0]}")
    return outcome[0]
