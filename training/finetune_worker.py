"""Fine-tuning's per-rank parts for the shared skeleton (`training.loop.run_worker`).

The task decides batch -> loss, the evaluation (perplexity / accuracy + macro-F1 / entity P/R/F1,
summed over ranks with all_reduce, computed with `training.task_metrics`) and what a checkpoint's
`model/` holds: the full model, or the peft adapter (gathered from ZeRO-3 partitions and checked
against the in-memory weights after every save).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from training.finetune_config import FinetuneConfig
from training.loop import WorkerContext, WorkerTask, run_worker, step_micro_batches

IGNORE_INDEX = -100


def collate(rows: dict, task: str, pad_token_id: int, torch, device) -> dict:
    """Right-pad a list of examples into tensors: input_ids, attention_mask, labels (and word_ids for ner)."""
    ids = [list(r) for r in rows["input_ids"]]
    width = max(len(r) for r in ids)
    input_ids = torch.full((len(ids), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, r in enumerate(ids):
        input_ids[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    batch = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}
    if task == "classification":
        batch["labels"] = torch.as_tensor([int(x) for x in rows["label"]], dtype=torch.long, device=device)
        return batch
    labels = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(rows["labels"]):
        labels[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    batch["labels"] = labels.to(device)
    if task == "ner":
        word_ids = torch.full((len(ids), width), -1, dtype=torch.long)
        for i, r in enumerate(rows["word_ids"]):
            word_ids[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        batch["word_ids"] = word_ids
    return batch


def _rows(batch: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] for k, v in batch.items()}


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "word_ids"}


def load_validation(val_shard, cfg: FinetuneConfig, task: str, pad_token_id: int, rank: int, world: int, torch, device):
    """This rank's validation micro-batches as (batch, weight); every rank gets the same number of batches.

    ZeRO-3 gathers parameters collectively inside forward, so a rank without rows of its own still
    runs a forward pass (on a copy of a real row, weight 0) for every batch the others run.
    """
    per_rank = cfg.optim.micro_batch_size
    batches = []
    for batch in val_shard.iter_batches(batch_size=per_rank * world, batch_format="numpy", drop_last=False):
        if len(batches) >= cfg.run.eval_batches:
            break
        n = len(batch["input_ids"])
        start, stop = min(rank * per_rank, n), min((rank + 1) * per_rank, n)
        if stop > start:
            batches.append((collate(_rows(batch, start, stop), task, pad_token_id, torch, device), 1.0))
        else:
            batches.append((collate(_rows(batch, 0, 1), task, pad_token_id, torch, device), 0.0))
    return batches


def evaluate_task(engine, batches, cfg: FinetuneConfig, labels: list[str], torch, dist, device,
                  tag_subtoken: str = "first") -> dict:
    """Validation metrics of the task, from counts summed over all ranks."""
    from training.finetune_data import word_tags_from_subtokens
    from training.task_metrics import classification_metrics, ner_counts, ner_metrics

    task, n_labels = cfg.task, len(labels)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, loss items
    confusion = torch.zeros((max(n_labels, 1), max(n_labels, 1)), dtype=torch.float64, device=device)
    entities = torch.zeros(3, dtype=torch.float64, device=device)  # correct, predicted, gold
    engine.eval()
    with torch.no_grad():
        for batch, weight in batches:
            logits = engine(**model_inputs(batch)).logits.float()
            if weight == 0.0:
                continue
            labels_t = batch["labels"]
            if task == "sft":
                logits = logits[:, -labels_t.shape[1]:, :]  # prompt tuning prepends virtual-token positions
                shift_logits, shift_labels = logits[:, :-1, :], labels_t[:, 1:]
            else:
                shift_logits, shift_labels = logits, labels_t
            flat_labels = shift_labels.reshape(-1)
            loss_sum = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]), flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
            sums += torch.tensor([loss_sum.item(), float((flat_labels != IGNORE_INDEX).sum())], dtype=torch.float64,
                                 device=device)
            if task == "classification":
                pred = logits.argmax(-1)
                for t, p in zip(labels_t.tolist(), pred.tolist()):
                    confusion[t, p] += 1
            elif task == "ner":
                pred = logits.argmax(-1).tolist()
                for row_pred, row_gold, row_words in zip(pred, labels_t.tolist(), batch["word_ids"].tolist()):
                    gold_tags = word_tags_from_subtokens(row_gold, row_words, labels, tag_subtoken=tag_subtoken)
                    pred_tags = word_tags_from_subtokens(row_pred, row_words, labels, num_words=len(gold_tags),
                                                         tag_subtoken=tag_subtoken)
                    entities += torch.tensor(ner_counts(gold_tags, pred_tags), dtype=torch.float64, device=device)
    engine.train()
    for tensor in (sums, confusion, entities):
        dist.all_reduce(tensor)
    if sums[1] == 0:
        return {}
    val_loss = (sums[0] / sums[1]).item()
    metrics = {"val_loss": val_loss}
    if task == "sft":
        metrics["val_perplexity"] = math.exp(min(val_loss, 50.0))
    elif task == "classification":
        metrics.update({f"val_{k}": v for k, v in classification_metrics(confusion.long().tolist()).items()})
    else:
        correct, predicted, gold = (int(x) for x in entities.tolist())
        metrics.update({f"val_{k}": v for k, v in ner_metrics(correct, predicted, gold).items()})
    return metrics


# --------------------------------------------------------------------------------------------
# Saving: full weights, or a peft adapter checked against the in-memory weights


def gathered_weights(engine, cfg: FinetuneConfig, rank: int, trainable_only: bool):
    """The module's state dict on rank 0 (None elsewhere); collective under ZeRO-3 (partitions gathered)."""
    if cfg.deepspeed.zero_stage == 3:
        # Every rank must call it: each contributes its partition. With frozen bases only the trainable
        # (adapter) tensors are gathered; other tools save empty (0-element) partitions here.
        return engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=trainable_only)
    return engine.module.state_dict() if rank == 0 else None


def verify_saved_adapter(engine, adapter_dir: str, rank: int, torch, dist) -> None:
    """All ranks: gather the trainable weights in memory; rank 0 compares them with the saved file.

    Every adapter tensor must be saved, full-size, and equal to the in-memory weights; otherwise the
    run fails (on every rank, so no rank waits forever).
    """
    import deepspeed
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    model = engine.module
    trainable = [p for p in model.parameters() if p.requires_grad]
    problems: list[str] = []
    with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
        if rank == 0:
            expected = get_peft_model_state_dict(model)
            saved = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
            for name, tensor in expected.items():
                got = saved.get(name)
                if got is None:
                    problems.append(f"{name}: missing from the saved adapter")
                elif tuple(got.shape) != tuple(tensor.shape) or got.numel() == 0:
                    problems.append(f"{name}: saved shape {tuple(got.shape)}, in memory {tuple(tensor.shape)}")
                elif not torch.equal(got.to(tensor.dtype).cpu(), tensor.detach().cpu()):
                    diff = (got.float().cpu() - tensor.detach().float().cpu()).abs().max().item()
                    problems.append(f"{name}: saved values differ from memory (max abs diff {diff:.3g})")
            if not expected:
                problems.append("no adapter tensors at all")
    failed = torch.tensor([1.0 if problems else 0.0])
    dist.all_reduce(failed)
    if failed.item():
        raise RuntimeError(f"adapter check after save failed in {adapter_dir}: " + "; ".join(problems[:5])
                           if problems else "adapter check after save failed on rank 0")


def save_finetune_weights(engine, ckpt_dir: str, cfg: FinetuneConfig, prepared: dict, facts: dict, rank: int,
                          torch, dist) -> None:
    """Checkpoint's loadable part: model/ (full model, or the adapter), tokenizer/, finetune.json."""
    model_dir = os.path.join(ckpt_dir, "model")
    peft_method = cfg.method.type != "full"
    weights = gathered_weights(engine, cfg, rank, trainable_only=peft_method)
    if peft_method:
        import deepspeed

        # peft reads prompt/prefix embeddings from the module itself, not from `weights`: under ZeRO-3
        # those are partitions until gathered, so rank 0 saves while every rank holds them gathered.
        trainable = [p for p in engine.module.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
            if rank == 0:
                engine.module.save_pretrained(model_dir, state_dict=weights, safe_serialization=True)
    elif rank == 0:
        engine.module.save_pretrained(model_dir, state_dict=weights, safe_serialization=True)
    if rank == 0:
        shutil.copytree(prepared["tokenizer_dir"], os.path.join(ckpt_dir, "tokenizer"))
        Path(ckpt_dir, "finetune.json").write_text(json.dumps(facts, indent=2, ensure_ascii=False))
    dist.barrier()
    if peft_method:
        verify_saved_adapter(engine, model_dir, rank, torch, dist)


def finetune_task(cfg: FinetuneConfig, prepared: dict, wctx: WorkerContext) -> WorkerTask:
    """The WorkerTask of a fine-tune: peft/full model, padded batches, task metrics, adapter-checked saves."""
    import ray.train
    import torch
    import torch.distributed as dist

    from training.finetune_model import base_shape, build_finetune_model, trainable_parameters
    from training.finetune_prep import base_model_path

    rank, world, device = wctx.rank, wctx.world, wctx.device
    labels, pad = prepared["labels"], prepared["pad_token_id"]
    model = build_finetune_model(cfg, base_model_path(cfg), labels, pad, prepared["tokenizer_dir"])
    trainable, total = trainable_parameters(model)
    if rank == 0:
        print(f"[raylm] {cfg.method.type} on {cfg.task}: {trainable:,} trainable of {total:,} parameters "
              f"({trainable / total:.4%})", flush=True)
    base_config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    facts = {"task": cfg.task, "method": cfg.method.type, "labels": labels, "base_shape": base_shape(base_config),
             "base_source": cfg.model.source, "base_path": str(base_model_path(cfg)), "max_len": cfg.data.max_len,
             "ner_tag_subtoken": prepared.get("ner_tag_subtoken", "first"),
             "ner_input": prepared.get("ner_input", "single"),
             "ner_separator_token_id": prepared.get("ner_separator_token_id")}

    per_rank = cfg.optim.micro_batch_size
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    val_batches = None

    def micro_batches(start: int):
        # `start` counts micro-batches at this world size's accumulation (the shared elastic data order).
        for rows in step_micro_batches(train_shard, wctx, per_rank, start // wctx.grad_accum_steps):
            yield collate(rows, cfg.task, pad, torch, device)

    def step_loss(engine, batch):
        return engine(**model_inputs(batch)).loss, int(batch["attention_mask"].sum())

    def evaluate(engine) -> dict:
        nonlocal val_batches
        if val_batches is None:
            val_batches = load_validation(val_shard, cfg, cfg.task, pad, rank, world, torch, device)
        return evaluate_task(engine, val_batches, cfg, labels, torch, dist, device,
                             prepared.get("ner_tag_subtoken", "first"))

    def save_weights(engine, ckpt_dir: str) -> None:
        save_finetune_weights(engine, ckpt_dir, cfg, prepared, facts, rank, torch, dist)

    metric, mode = cfg.selection_metric
    es = cfg.run.early_stopping
    return WorkerTask(
        model=model,
        micro_batches=micro_batches,
        step_loss=step_loss,
        save_weights=save_weights,
        evaluate=evaluate,
        static_metrics={"num_params": total, "trainable_params": trainable, "trainable_fraction": trainable / total},
        selection=(metric, mode, es.patience if es else None, es.min_delta if es else 0.0),
        eval_at_checkpoints=True,
    )


def finetune_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry of fine-tuning: the shared skeleton with the fine-tune task."""
    cfg = FinetuneConfig.model_validate(loop_config["config"])
    run_worker(loop_config, cfg, finetune_task)
