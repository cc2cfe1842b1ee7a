"""The worker skeleton that Ray Train runs on every rank under DeepSpeed ZeRO, for every run kind.

`run_worker` owns what pretraining and fine-tuning share: distributed setup, the engine
(`training.engine.build_engine`), resume, the step loop with gradient accumulation, the cadence of
log / eval / checkpoint, early stopping, reports and checkpoint saving. A run kind supplies a
`WorkerTask`: the model, its micro-batches, batch -> loss, an evaluation and how its weights are
saved (pretraining's: `training.pretrain_worker`, fine-tuning's: `training.finetune_worker`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.checkpoints import checkpoint_dir_name, write_manifest
from training.console import quiet_console
from training.universal import DS_TAG, ResumePlan, accumulation_for, prepare_resume
FAULT_ENV = "RAYLM_TEST_FAULT"  # test-only: "rank:step:marker_file" kills that rank once after that step


@dataclass
class WorkerContext:
    """Where this rank runs; handed to the task builder."""

    rank: int
    world: int
    device: Any
    use_gpu: bool
    # Accumulation steps at this world size and the global batch (rows per optimizer step) they keep:
    # a run resumed on another worker count keeps its checkpoint's global batch (training.universal).
    grad_accum_steps: int = 1
    global_batch_rows: int = 0


@dataclass
class WorkerTask:
    """The per-task parts the shared skeleton calls. Every callable taking `engine` runs on all ranks."""

    model: Any
    # start micro-batch index -> this rank's micro-batches, forever (data order fixed: resume is exact)
    micro_batches: Callable[[int], Iterator[Any]]  # with WorkerContext.grad_accum_steps per step
    # (engine, micro-batch) -> (mean loss tensor, tokens counted for throughput)
    step_loss: Callable[[Any, Any], tuple[Any, int]]
    # (engine, checkpoint dir) -> None: collective; rank 0 writes loadable weights (+ tokenizer) into the dir
    save_weights: Callable[[Any, str], None]
    # engine -> metrics dict identical on every rank (all_reduced inside); None: no validation data
    evaluate: Callable[[Any], dict] | None = None
    # numbers added to every report (num_params, trainable_params, ...)
    static_metrics: dict = field(default_factory=dict)
    # (metric, mode, patience or None, min_delta): early stopping and best-checkpoint bookkeeping
    selection: tuple[str, str, int | None, float] | None = None
    # evaluate at every checkpoint too (so each checkpoint carries the selection metric)
    eval_at_checkpoints: bool = False


def _maybe_inject_fault(spec: str | None, rank: int, step: int) -> None:
    """Test-only fault hook: the named rank dies (os._exit) once, right after the named step.

    `spec` comes from the driver's $RAYLM_TEST_FAULT; the marker file makes it fire only once,
    so the restarted worker group runs through.
    """
    if not spec:
        return
    fault_rank, fault_step, marker = spec.split(":", 2)
    if rank == int(fault_rank) and step == int(fault_step) and not os.path.exists(marker):
        Path(marker).write_text(f"killed rank {rank} after step {step}\n")
        print(f"[raylm] {FAULT_ENV}: killing rank {rank} after step {step}", flush=True)
        os._exit(1)


def global_batches(shard, batch_rows: int, start_batch: int):
    """Yield global batches (numpy dicts) forever, epoch after epoch, starting at `start_batch`.

    Every rank reads the same unsplit, order-preserving stream and takes its own slice, so the
    data order is a pure function of the prepared Parquet: a restarted rank continues exactly
    where the lost one stopped.
    """
    skip = start_batch
    while True:
        produced = 0
        for batch in shard.iter_batches(batch_size=batch_rows, batch_format="numpy", drop_last=True):
            produced += 1
            if skip:
                skip -= 1
                continue
            yield batch
        if produced == 0:
            raise ValueError(f"the training split has fewer than {batch_rows} rows: lower optim.micro_batch_size")


def step_micro_batches(shard, wctx: "WorkerContext", per_rank: int, start_step: int):
    """This rank's micro-batch row slices, step after step, from `start_step` on.

    One global batch is one optimizer step's rows; micro-batch m of a step is rows
    [(m * world + rank) * per_rank, + per_rank). Any (world size, accumulation) pair with the same
    global batch averages each step's gradient over the same rows, so a run resumed on another
    number of workers continues the same data order.
    """
    gas, world, rank = wctx.grad_accum_steps, wctx.world, wctx.rank
    for batch in global_batches(shard, wctx.global_batch_rows, start_step):
        for m in range(gas):
            first = (m * world + rank) * per_rank
            yield {key: column[first:first + per_rank] for key, column in batch.items()}


def init_worker(cfg) -> WorkerContext:
    """Device and process group for this rank (DeepSpeed reuses Ray Train's)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.scaling.use_gpu else "cpu")
    import ray
    import ray.train
    import torch

    from training.engine import import_deepspeed

    deepspeed = import_deepspeed()  # the first import of deepspeed in this worker
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    print(f"raylm-worker rank={rank} node_id={ray.get_runtime_context().get_node_id()}", flush=True)
    device = torch.device("cuda", ctx.get_local_rank()) if cfg.scaling.use_gpu else torch.device("cpu")
    if cfg.scaling.use_gpu:
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend="nccl" if cfg.scaling.use_gpu else "gloo")
    quiet_console()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars at every checkpoint
    return WorkerContext(rank=rank, world=world, device=device, use_gpu=cfg.scaling.use_gpu)


def _save_checkpoint(engine, task: WorkerTask, cfg, state: dict, run_dir: str, rank: int) -> str:
    """Every rank writes its DeepSpeed shards straight into the run directory; rank 0 the manifest, last.

    Ray Train hears of the checkpoint only after that (a NO_UPLOAD report), and resume, export and
    conversion take only checkpoints whose manifest verifies: a node that dies mid-save leaves a
    directory that is never used.
    """
    import torch.distributed as dist

    ckpt_dir = Path(run_dir) / checkpoint_dir_name(state["step"])
    if rank == 0 and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)  # left by an attempt that died while saving this step: never mix its files in
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=DS_TAG, client_state={"raylm_step": state["step"]})
    task.save_weights(engine, str(ckpt_dir))
    if rank == 0:
        Path(ckpt_dir, "resolved_config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
        Path(ckpt_dir, "trainer_state.json").write_text(json.dumps(state, indent=2))
    dist.barrier()  # every rank's files are on disk
    if rank == 0:
        write_manifest(ckpt_dir, {k: state.get(k) for k in ("step", "world_size", "global_batch_rows", "zero_stage")})
    dist.barrier()
    return str(ckpt_dir)


def _plan_resume(cfg, wctx: WorkerContext, run_dir: str) -> ResumePlan | None:
    """Before the engine exists: which checkpoint to resume and at what accumulation (see training.universal).

    Sets `wctx.grad_accum_steps` / `wctx.global_batch_rows`: the checkpoint's global batch when
    resuming, else the config's (the one of `scaling.num_workers`' maximum for an elastic run).
    """
    import ray.train
    import torch.distributed as dist

    reported = ray.train.get_checkpoint()  # on local/shared storage its path is the directory itself
    plan = prepare_resume(run_dir, wctx.world, cfg.optim.micro_batch_size, cfg.deepspeed.zero_stage, wctx.rank, dist,
                          log=lambda msg: print(msg, flush=True), reported=reported.path if reported else None)
    rows = plan.global_batch_rows if plan else (
        cfg.optim.micro_batch_size * cfg.optim.grad_accum_steps * cfg.scaling.max_workers)
    wctx.global_batch_rows = rows
    wctx.grad_accum_steps = plan.grad_accum_steps if plan else accumulation_for(rows, cfg.optim.micro_batch_size,
                                                                                wctx.world)
    return plan


def _start_from_other_run(engine, init_checkpoint: str, optim, world: int, rank: int) -> dict:
    """Load another run's checkpoint (a PBT exploit) with this run's optimizer settings in effect.

    The saved lr scheduler and optimizer param groups hold the other run's lr / weight decay: keep its
    weights and moments, put `optim`'s settings in effect at the saved step. Returns its trainer state.
    """
    saved = json.loads(Path(init_checkpoint, "trainer_state.json").read_text())
    if saved.get("world_size", world) != world:
        raise RuntimeError(f"{init_checkpoint} was written by {saved['world_size']} workers, this run has {world}; "
                           "a sweep's trials share one scaling.num_workers")
    engine.load_checkpoint(init_checkpoint, tag=DS_TAG, load_lr_scheduler_states=False)
    apply_optimizer_settings(engine, optim, saved["step"])
    if rank == 0:
        print(f"[raylm] started from step {saved['step']} of {init_checkpoint}", flush=True)
    return saved


def apply_optimizer_settings(engine, optim, step: int) -> None:
    """Put `optim`'s lr schedule, weight decay, betas and eps in effect after loading another run's optimizer.

    Param groups follow `training.schedule.param_groups`: group 0 decays, later groups (1-D tensors) do not.
    The scheduler continues at `step`, so the lr of the next update is optim.lr * lr_multiplier(step).
    """
    from training.schedule import lr_multiplier

    groups = engine.optimizer.param_groups
    for i, group in enumerate(groups):
        group["lr"] = optim.lr * lr_multiplier(step, optim)
        group["initial_lr"] = optim.lr
        group["weight_decay"] = optim.weight_decay if i == 0 else 0.0
        group["betas"] = (optim.beta1, optim.beta2)
        group["eps"] = optim.eps
    scheduler = engine.lr_scheduler
    scheduler.base_lrs = [optim.lr] * len(groups)
    scheduler.last_epoch = step
    scheduler._last_lr = [group["lr"] for group in groups]


SELECTION_SCORE = "selection_score"  # reported with every checkpoint: Ray keeps the highest (the best ones)


def update_selection(state: dict, metrics: dict, selection) -> tuple[bool, bool]:
    """Best-metric bookkeeping after an evaluation: (improved, early stopping's patience ran out)."""
    metric, mode, patience, min_delta = selection
    value = metrics.get(metric)
    if value is None or not math.isfinite(value):
        return False, False
    best = state.get("best")
    improved = best is None or (value < best["value"] - min_delta if mode == "min" else value > best["value"] + min_delta)
    if improved:
        state["best"] = {"metric": metric, "mode": mode, "value": value, "step": state["step"]}
        state["evals_since_best"] = 0
    else:
        state["evals_since_best"] = state.get("evals_since_best", 0) + 1
    return improved, patience is not None and state["evals_since_best"] >= patience


def run_worker(loop_config: dict, cfg, build_task: Callable[[Any, dict, WorkerContext], WorkerTask]) -> None:
    """The shared per-rank algorithm: build task and engine, resume, train with cadence, report, checkpoint."""
    import ray.train
    import torch
    import torch.distributed as dist

    from training.engine import build_engine

    wctx = init_worker(cfg)
    rank, world, device = wctx.rank, wctx.world, wctx.device
    run_dir = loop_config["run_dir"]
    plan = _plan_resume(cfg, wctx, run_dir)
    task = build_task(cfg, loop_config["prepared"], wctx)
    engine = build_engine(task.model, cfg, world, grad_accum_steps=wctx.grad_accum_steps,
                          load_universal=bool(plan and plan.load_universal))
    state, resumed = {"step": 0, "tokens_seen": 0}, {}
    if plan:
        engine.load_checkpoint(str(plan.load_dir), tag=DS_TAG)
        state = dict(plan.saved_state)
        resumed = {"resumed_from_step": state["step"], "resumed_from_world_size": plan.saved_world_size}
        if plan.load_universal:
            resumed["universal_conversion_s"] = plan.conversion_s
        if rank == 0:
            print(f"[raylm] resumed from step {state['step']} ({plan.checkpoint})", flush=True)
    elif loop_config.get("init_checkpoint"):
        state = _start_from_other_run(engine, loop_config["init_checkpoint"], cfg.optim, world, rank)
        resumed = {"resumed_from_step": state["step"]}
    state.update(world_size=world, global_batch_rows=wctx.global_batch_rows, zero_stage=cfg.deepspeed.zero_stage)

    optim, run = cfg.optim, cfg.run
    gas = wctx.grad_accum_steps
    batches = task.micro_batches(state["step"] * gas)
    # Training mode is set here, not inherited: from_pretrained hands over a model in eval mode (dropout
    # off), and only the first evaluation's engine.train() would switch it on. A run resumed after that
    # evaluation would then train without dropout where the clean run trained with it.
    engine.train()
    window_start, window_steps, window_tokens, reported = time.perf_counter(), 0, 0, False
    window_data_wait = 0.0  # seconds this rank waited for micro-batches (Ray Data) in the window
    while state["step"] < optim.max_steps and not state.get("stopped_early"):
        # Dropout draws depend only on (seed, step, rank): a resumed run repeats a clean one exactly.
        torch.manual_seed(cfg.run.seed * 1_000_003 + state["step"] * 1009 + rank)
        lr_used = engine.get_lr()[0]
        loss_sum = torch.zeros(1, device=device)
        for _ in range(gas):
            fetch_started = time.perf_counter()
            micro_batch = next(batches)
            window_data_wait += time.perf_counter() - fetch_started
            loss, tokens = task.step_loss(engine, micro_batch)
            engine.backward(loss)
            engine.step()  # DeepSpeed only updates at the accumulation boundary
            loss_sum += loss.detach().float()
            window_tokens += tokens
        state["step"] += 1
        window_steps += 1
        step = state["step"]
        _maybe_inject_fault(loop_config.get("test_fault"), rank, step)

        is_last = step == optim.max_steps
        want_ckpt = step % run.checkpoint_every_steps == 0 or is_last
        want_log = step % run.log_every_steps == 0 or is_last
        want_eval = task.evaluate is not None and (
            step % run.eval_every_steps == 0 or is_last or (task.eval_at_checkpoints and want_ckpt))
        if not (want_log or want_eval or want_ckpt):
            continue

        counts = torch.tensor([loss_sum.item(), float(window_tokens)], dtype=torch.float64, device=device)
        dist.all_reduce(counts)
        state["tokens_seen"] += int(counts[1].item())
        elapsed = time.perf_counter() - window_start
        grad_norm = engine.get_global_grad_norm()
        metrics = {
            "step": step,
            "loss": counts[0].item() / (gas * world),
            "lr": lr_used,
            "tokens_seen": state["tokens_seen"],
            "tokens_per_s": counts[1].item() / elapsed,
            "step_time_s": elapsed / window_steps,
            # Rank 0's wait for input per step: near step_time_s means the data stream, not the model, sets the pace.
            "data_wait_s": window_data_wait / window_steps,
            "world_size": world,
            "max_steps": optim.max_steps,
            **task.static_metrics,
        }
        if grad_norm is not None and math.isfinite(float(grad_norm)):
            metrics["grad_norm"] = float(grad_norm)  # DeepSpeed only tracks it when ZeRO clips
        metrics.update(resumed)
        if want_eval:
            metrics.update(task.evaluate(engine))
            if task.selection is not None:
                improved, exhausted = update_selection(state, metrics, task.selection)
                # The step of each new best ranks checkpoints: the latest improvement scores highest, a
                # checkpoint that did not improve scores lowest (min_delta applies, unlike a raw metric).
                metrics[SELECTION_SCORE] = step if improved else -1
                if exhausted:
                    state["stopped_early"] = True
                    want_ckpt = True  # the stopping point is a checkpoint too: a rerun sees the run is over
                    if rank == 0:
                        print(f"[raylm] early stopping at step {step}: {task.selection[0]} has not improved for "
                              f"{task.selection[2]} evaluations (best {state['best']['value']:.6g} at step "
                              f"{state['best']['step']})", flush=True)
                if state.get("best"):
                    metrics.update(best_metric=state["best"]["value"], best_step=state["best"]["step"])
                if state.get("stopped_early"):
                    metrics["early_stopped"] = True
        if want_ckpt:
            state["last_eval"] = {k: v for k, v in metrics.items() if k.startswith("val_")}
            ckpt_dir = _save_checkpoint(engine, task, cfg, dict(state), run_dir, rank)
        # Evaluation and checkpoint writing are not training throughput; the report itself is
        # (it can block until the controller takes the previous one), so the next window starts here.
        window_start, window_steps, window_tokens, window_data_wait = time.perf_counter(), 0, 0, 0.0
        if want_ckpt:
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir),
                checkpoint_dir_name=checkpoint_dir_name(step),
                checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD,  # written in place, manifest last
            )
        else:
            ray.train.report(metrics)
        reported = True

    if not reported:
        # Rerun of a finished run: nothing to train, but the driver still gets the final state.
        ray.train.report({"step": state["step"], "tokens_seen": state["tokens_seen"], "max_steps": optim.max_steps,
                          "already_complete": True})
