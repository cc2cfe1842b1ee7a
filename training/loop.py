"""The per-worker training function that Ray Train runs on every rank under DeepSpeed ZeRO."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from training.checkpoints import checkpoint_dir_name
from training.config import PretrainConfig
from training.deepspeed_config import build_deepspeed_config
from training.model import build_model, count_parameters
from training.schedule import lambda_scheduler, param_groups

DS_TAG = "ds"  # fixed DeepSpeed checkpoint tag: one checkpoint per directory
FAULT_ENV = "RAYLM_TEST_FAULT"  # test-only: "rank:step:marker_file" kills that rank once after that step


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
            raise ValueError(f"the training split has fewer than {batch_rows} blocks: lower optim.micro_batch_size")


def _rank_slice(batch, rank: int, per_rank: int, torch, device):
    rows = batch["input_ids"][rank * per_rank:(rank + 1) * per_rank]
    return torch.as_tensor(list(rows) if rows.dtype == object else rows, dtype=torch.long, device=device)


def load_validation_blocks(val_shard, cfg: PretrainConfig, rank: int, world: int, torch, device) -> list:
    """This rank's validation micro-batches, read once and kept: every evaluation sees the same blocks."""
    per_rank = cfg.optim.micro_batch_size
    blocks = []
    for batch in val_shard.iter_batches(batch_size=per_rank * world, batch_format="numpy", drop_last=True):
        if len(blocks) >= cfg.run.eval_batches:
            break
        blocks.append(_rank_slice(batch, rank, per_rank, torch, device))
    return blocks


def evaluate(engine, val_blocks: list, torch, dist, device) -> float | None:
    """Token-weighted mean validation loss over the held-out blocks of every rank."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    engine.eval()
    with torch.no_grad():
        for ids in val_blocks:
            loss = engine(input_ids=ids, labels=ids).loss
            tokens = ids.numel() - ids.shape[0]  # labels are shifted by one
            total += torch.tensor([loss.item() * tokens, tokens], dtype=torch.float64, device=device)
    engine.train()
    dist.all_reduce(total)
    return (total[0] / total[1]).item() if total[1] > 0 else None


def _save_checkpoint(engine, cfg: PretrainConfig, state: dict, prepared: dict, rank: int, torch, dist) -> str:
    """Every rank writes its DeepSpeed shards; rank 0 adds loadable weights, tokenizer and config."""
    ckpt_dir = tempfile.mkdtemp(prefix=f"raylm-ckpt-r{rank}-")
    engine.save_checkpoint(ckpt_dir, tag=DS_TAG, client_state={"raylm_step": state["step"]})
    if cfg.deepspeed.zero_stage == 3:
        # Collective: every rank contributes its partition; rank 0 receives the full tensors.
        weights = engine._zero3_consolidated_16bit_state_dict()
    else:
        weights = engine.module.state_dict() if rank == 0 else None
    if rank == 0:
        engine.module.save_pretrained(os.path.join(ckpt_dir, "model"), state_dict=weights, safe_serialization=True)
        shutil.copytree(prepared["tokenizer_dir"], os.path.join(ckpt_dir, "tokenizer"))
        Path(ckpt_dir, "resolved_config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
        Path(ckpt_dir, "trainer_state.json").write_text(json.dumps(state, indent=2))
    dist.barrier()
    return ckpt_dir


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry: build model and DeepSpeed engine, resume if a checkpoint exists, train, report."""
    cfg = PretrainConfig.model_validate(loop_config["config"])
    prepared = loop_config["prepared"]
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.scaling.use_gpu else "cpu")

    import deepspeed
    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    print(f"raylm-worker rank={rank} node_id={ray.get_runtime_context().get_node_id()}", flush=True)
    device = torch.device("cuda", ctx.get_local_rank()) if cfg.scaling.use_gpu else torch.device("cpu")
    if cfg.scaling.use_gpu:
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend="nccl" if cfg.scaling.use_gpu else "gloo")

    model = build_model(cfg.model, prepared["vocab_size"], prepared["pad_token_id"], prepared["eos_token_id"], cfg.run.seed)
    n_params = count_parameters(model)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.optim.weight_decay),
        config=build_deepspeed_config(cfg, world),
        lr_scheduler=lambda_scheduler(cfg.optim),
    )

    state = {"step": 0, "tokens_seen": 0, "world_size": world}
    resumed_from_step = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            saved = json.loads(Path(ckpt_dir, "trainer_state.json").read_text())
            if saved.get("world_size", world) != world:
                raise RuntimeError(
                    f"checkpoint was written by {saved['world_size']} workers, this run has {world}: ZeRO shards "
                    "cannot be re-partitioned; resume with the same scaling.num_workers"
                )
            engine.load_checkpoint(ckpt_dir, tag=DS_TAG)
            state = saved
            resumed_from_step = state["step"]
        if rank == 0:
            print(f"[raylm] resumed from step {state['step']} ({checkpoint.path})", flush=True)

    optim = cfg.optim
    per_rank, gas = optim.micro_batch_size, optim.grad_accum_steps
    tokens_per_step = per_rank * gas * world * cfg.data.seq_len
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if prepared.get("val_path") else None
    val_blocks = None
    batches = global_batches(train_shard, per_rank * world, state["step"] * gas)

    window_start, window_steps, reported = time.perf_counter(), 0, False
    while state["step"] < optim.max_steps:
        lr_used = engine.get_lr()[0]
        loss_sum = torch.zeros(1, device=device)
        for _ in range(gas):
            ids = _rank_slice(next(batches), rank, per_rank, torch, device)
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()  # DeepSpeed only updates at the accumulation boundary
            loss_sum += loss.detach().float()
        state["step"] += 1
        state["tokens_seen"] += tokens_per_step
        window_steps += 1
        step = state["step"]
        _maybe_inject_fault(loop_config.get("test_fault"), rank, step)

        is_last = step == optim.max_steps
        want_log = step % cfg.run.log_every_steps == 0 or is_last
        want_eval = val_shard is not None and (step % cfg.run.eval_every_steps == 0 or is_last)
        want_ckpt = step % cfg.run.checkpoint_every_steps == 0 or is_last
        if not (want_log or want_eval or want_ckpt):
            continue

        dist.all_reduce(loss_sum)
        elapsed = time.perf_counter() - window_start
        grad_norm = engine.get_global_grad_norm()
        metrics = {
            "step": step,
            "loss": loss_sum.item() / (gas * world),
            "lr": lr_used,
            "tokens_seen": state["tokens_seen"],
            "tokens_per_s": window_steps * tokens_per_step / elapsed,
            "step_time_s": elapsed / window_steps,
            "num_params": n_params,
            "world_size": world,
            "max_steps": optim.max_steps,
        }
        if grad_norm is not None and math.isfinite(float(grad_norm)):
            metrics["grad_norm"] = float(grad_norm)  # DeepSpeed only tracks it when ZeRO clips
        if resumed_from_step is not None:
            metrics["resumed_from_step"] = resumed_from_step
        if want_eval:
            if val_blocks is None:
                val_blocks = load_validation_blocks(val_shard, cfg, rank, world, torch, device)
            val_loss = evaluate(engine, val_blocks, torch, dist, device)
            if val_loss is not None:
                metrics.update(val_loss=val_loss, val_perplexity=math.exp(min(val_loss, 50.0)))
        if want_ckpt:
            ckpt_dir = _save_checkpoint(engine, cfg, dict(state), prepared, rank, torch, dist)
        # Evaluation and checkpoint writing are not training throughput; the report itself is
        # (it can block until the controller takes the previous one), so the next window starts here.
        window_start, window_steps = time.perf_counter(), 0
        if want_ckpt:
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir),
                checkpoint_dir_name=checkpoint_dir_name(step),
                delete_local_checkpoint_after_upload=True,
            )
        else:
            ray.train.report(metrics)
        reported = True

    if not reported:
        # Rerun of a finished run: nothing to train, but the driver still gets the final state.
        ray.train.report({"step": state["step"], "tokens_seen": state["tokens_seen"], "max_steps": optim.max_steps,
                          "already_complete": True})
