"""Fine-tune a base model (raylm export, HF directory, GGUF) on sft / classification / ner on Ray Train + DeepSpeed.

    python -m training.finetune --config configs/finetune/cls_minilm_lora_cpu.yaml [--set optim.lr=1e-3 ...]
    ray job submit --working-dir . -- python -m training.finetune --config configs/finetune/sft_llama8b_lora_gpu.yaml

Reads top to bottom as the algorithm: parse -> validate -> prepare data -> start/attach Ray ->
build the trainer -> fit -> write results. Rerunning the same command resumes the run. Export
the best checkpoint afterwards with `python -m training.export <run_dir> <out_dir> [--adapter]`.
"""

from __future__ import annotations

from cluster.requirements_check import check_requirements

check_requirements("training.finetune", run_as_main=__name__ == "__main__")  # before any third-party import

import argparse
import json
import sys

from training import driver
from training.config import ConfigError, load_config_of_kind
from training.finetune_config import FinetuneConfig

# What a checkpoint means: the keys that must match for its shards to load and mean the same run. The
# task and base model, the method and the adapter's shape and scale, and what decides the DeepSpeed shard
# layout (see training.pretrain). The label set and the tokenizer come from the data and the base model:
# compared after data preparation by driver.check_resume_data.
FINETUNE_MEANING_KEYS = (
    "task", "model.source", "model.path",
    "method.type", "method.lora.r", "method.lora.alpha", "method.lora.target_modules", "method.num_virtual_tokens",
    "deepspeed.zero_stage", "deepspeed.precision", "deepspeed.offload_optimizer", "deepspeed.offload_params",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.finetune", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="fine-tune YAML with kind: finetune (see configs/finetune/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set method.lora.r=16 (repeatable)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to attach to (default: $RAY_ADDRESS, else start a local Ray)")
    parser.add_argument("--validate-only", action="store_true", help="check the config and exit")
    return parser.parse_args(argv)


def check_resume(cfg: FinetuneConfig) -> str | None:
    """Refuse to mix a changed config into an old run's checkpoints; return the latest checkpoint if any."""
    return driver.check_resume(cfg, FINETUNE_MEANING_KEYS)


def build_datasets(prepared: dict) -> dict:
    """The Ray Data streams of the prepared Parquet files: {"train": ..., "val": ...}."""
    return {"train": driver.parquet_dataset(prepared["train_path"]),
            "val": driver.parquet_dataset(prepared["val_path"])}


def build_trainer(cfg: FinetuneConfig, prepared: dict, *, callbacks=(), storage_path: str | None = None,
                  name: str | None = None, datasets: dict | None = None, init_checkpoint: str | None = None):
    """A TorchTrainer whose workers run `training.finetune_worker.finetune_loop_per_worker`.

    Ray keeps the run.keep_checkpoints best checkpoints by the selection metric (early stopping's,
    else the task's default; ranked by the loop's `selection_score`) plus the latest.
    `callbacks` / `storage_path` / `name` / `datasets` / `init_checkpoint` as in
    `training.pretrain.build_trainer` (a sweep shares the datasets and PBT starts from another trial).
    """
    from ray.train import CheckpointConfig

    from training.finetune_worker import finetune_loop_per_worker
    from training.loop import SELECTION_SCORE

    loop_config = {"config": cfg.model_dump(mode="json"), "prepared": prepared, "init_checkpoint": init_checkpoint}
    return driver.torch_trainer(
        cfg, finetune_loop_per_worker, loop_config, datasets or build_datasets(prepared),
        callbacks=callbacks, storage_path=storage_path, name=name,
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints,
                                           checkpoint_score_attribute=SELECTION_SCORE, checkpoint_score_order="max"),
    )


def write_results(cfg: FinetuneConfig, result, data_stats: dict) -> dict:
    """results.json and loss_curve.png (with the task metric) in the run directory."""
    from training.export import find_checkpoint
    from training.tracking import plot_loss_curve, read_metrics

    records = read_metrics(cfg.run_dir)
    final = records[-1] if records else {}
    metric, mode = cfg.selection_metric
    evals = [r for r in records if metric in r]
    try:
        best = str(find_checkpoint(cfg.run_dir, "best"))
    except FileNotFoundError:
        best = None
    summary = {
        "run_dir": str(cfg.run_dir),
        "task": cfg.task,
        "method": cfg.method.type,
        "latest_checkpoint": result.checkpoint.path if result.checkpoint else None,
        "best_checkpoint": best,
        "selection_metric": metric,
        "best_value": (min if mode == "min" else max)(r[metric] for r in evals) if evals else None,
        "final_step": final.get("step"),
        "final_loss": final.get("loss"),
        "early_stopped": any(r.get("early_stopped") for r in records),
        "final_eval": {k: v for k, v in (evals[-1] if evals else {}).items() if k.startswith("val_")},
        "trainable_params": final.get("trainable_params"),
        "trainable_fraction": final.get("trainable_fraction"),
        "data": data_stats,
    }
    png = plot_loss_curve(records, cfg.run_dir / "loss_curve.png")
    summary["loss_curve"] = str(png) if png else None
    (cfg.run_dir / "results.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config_of_kind(args.config, args.set, "finetune")
        resume_from = check_resume(cfg)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    if args.validate_only:
        print(f"{args.config}: valid")
        return 0

    from dataclasses import asdict

    from training.finetune_data import DataError
    from training.finetune_prep import prepare_finetune_data

    try:
        prepared_data = prepare_finetune_data(cfg)
    except (OSError, ValueError, DataError) as err:  # missing files, bad rows, and permissions / a full disk
        print(driver.data_error_message(err), file=sys.stderr)
        return 2
    prepared = {k: v for k, v in asdict(prepared_data).items() if k != "stats"}
    try:
        driver.check_resume_data(resume_from, prepared["tokenizer_dir"], prepared["labels"], prepared["ner_input"])
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    if resume_from:
        print(f"[raylm] resuming {cfg.run_dir} from {resume_from}")

    driver.warn_relative_storage(cfg, args.address)
    driver.start_ray(cfg, args.address)
    trainer = build_trainer(cfg, prepared)
    try:
        result = driver.fit_with_progress(cfg, trainer)
    except KeyboardInterrupt:
        return driver.INTERRUPTED
    if result is None:
        return 1
    summary = write_results(cfg, result, prepared_data.stats)
    print(f"[raylm] done: step {summary['final_step']}, loss {summary['final_loss']}, "
          f"best {summary['selection_metric']} {summary['best_value']}"
          f"{' (stopped early)' if summary['early_stopped'] else ''}")
    print(f"[raylm] best checkpoint: {summary['best_checkpoint']}")
    adapter = " --adapter" if cfg.method.type != "full" else ""
    print(f"[raylm] export: python -m training.export {cfg.run_dir} <out_dir>{adapter}")
    print(f"[raylm] results: {cfg.run_dir / 'results.json'}  plot: {summary['loss_curve']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
