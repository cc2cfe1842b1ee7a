"""Pretraining's per-rank parts for the shared skeleton (`training.loop.run_worker`): packed token blocks
of a causal LM, loss on every next token, validation loss and perplexity. `train_loop_per_worker` is the
Ray Train entry of `training.pretrain`."""

from __future__ import annotations

import math

from training.loop import WorkerContext, WorkerTask, run_worker, step_micro_batches


def _rank_slice(batch, rank: int, per_rank: int, torch, device):
    return _as_ids(batch["input_ids"][rank * per_rank:(rank + 1) * per_rank], torch, device)


def _as_ids(rows, torch, device):
    import numpy as np

    # Parquet list columns arrive as an object array of per-row arrays: stack them into one 2-D array.
    return torch.as_tensor(np.stack(list(rows)) if rows.dtype == object else rows, dtype=torch.long, device=device)


def load_validation_blocks(val_shard, cfg, rank: int, world: int, torch, device) -> list:
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


def pretrain_task(cfg, prepared: dict, wctx: WorkerContext) -> WorkerTask:
    """Causal LM on packed blocks: loss on every next token, validation loss and perplexity."""
    import os as _os
    import shutil

    import ray.train
    import torch
    import torch.distributed as dist

    from training.model import build_model, count_parameters

    rank, world, device = wctx.rank, wctx.world, wctx.device
    model = build_model(cfg.model, prepared["vocab_size"], prepared["pad_token_id"], prepared["eos_token_id"], cfg.run.seed)
    per_rank = cfg.optim.micro_batch_size
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if prepared.get("val_path") else None
    val_blocks: list | None = None

    def micro_batches(start: int):
        # `start` counts micro-batches at this world size's accumulation: step start // gas.
        for batch in step_micro_batches(train_shard, wctx, per_rank, start // wctx.grad_accum_steps):
            yield _as_ids(batch["input_ids"], torch, device)

    def step_loss(engine, ids):
        return engine(input_ids=ids, labels=ids).loss, ids.numel()

    def evaluate_blocks(engine) -> dict:
        nonlocal val_blocks
        if val_blocks is None:
            val_blocks = load_validation_blocks(val_shard, cfg, rank, world, torch, device)
        val_loss = evaluate(engine, val_blocks, torch, dist, device)
        return {} if val_loss is None else {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50.0))}

    def save_weights(engine, ckpt_dir: str) -> None:
        if cfg.deepspeed.zero_stage == 3:
            # Collective: every rank contributes its partition; rank 0 receives the full tensors.
            weights = engine._zero3_consolidated_16bit_state_dict()
        else:
            weights = engine.module.state_dict() if rank == 0 else None
        if rank == 0:
            engine.module.save_pretrained(_os.path.join(ckpt_dir, "model"), state_dict=weights, safe_serialization=True)
            shutil.copytree(prepared["tokenizer_dir"], _os.path.join(ckpt_dir, "tokenizer"))

    return WorkerTask(
        model=model,
        micro_batches=micro_batches,
        step_loss=step_loss,
        save_weights=save_weights,
        evaluate=evaluate_blocks if val_shard is not None else None,
        static_metrics={"num_params": count_parameters(model)},
    )


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry of pretraining: the shared skeleton with the causal-LM block task."""
    from training.config import PretrainConfig

    cfg = PretrainConfig.model_validate(loop_config["config"])
    run_worker(loop_config, cfg, pretrain_task)
