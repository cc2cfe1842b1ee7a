"""Pretrain a causal LM from scratch (or continue a local checkpoint) on Ray Train + DeepSpeed ZeRO.

    python -m training.pretrain --config configs/pretrain/demo_cpu.yaml [--set optim.lr=1e-3 ...]
    ray job submit --working-dir . -- python -m training.pretrain --config configs/pretrain/demo_cpu.yaml

Reads top to bottom as the algorithm: parse -> validate -> prepare data -> start/attach Ray ->
build the trainer -> fit -> write results. Rerunning the same command resumes the run.
"""

from __future__ import annotations

from cluster.requirements_check import check_requirements

check_requirements("training.pretrain", run_as_main=__name__ == "__main__")  # before any third-party import

import argparse
import json
import sys

from training import driver
from training.config import ConfigError, PretrainConfig, load_config_of_kind

# What a checkpoint means: the keys that must match for its shards to load and mean the same run.
# The model's architecture, the tokenizer's identity (a trained BPE also depends on the corpus: compared
# after data preparation by driver.check_resume_data), and what decides the DeepSpeed shard layout: the
# ZeRO stage, the precision (bf16/fp16 keep fp32 master copies) and offload (another optimizer class).
PRETRAIN_MEANING_KEYS = (
    "model.source", "model.path", "model.hidden_size", "model.num_layers", "model.num_heads", "model.num_kv_heads",
    "model.intermediate_size", "model.max_position_embeddings", "model.rope_theta", "model.tie_word_embeddings",
    "tokenizer.path", "tokenizer.vocab_size", "tokenizer.min_frequency",
    "deepspeed.zero_stage", "deepspeed.precision", "deepspeed.offload_optimizer", "deepspeed.offload_params",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="run YAML (see configs/pretrain/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=1e-3 (repeatable)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to attach to (default: $RAY_ADDRESS, else start a local Ray)")
    parser.add_argument("--validate-only", action="store_true", help="check the config and exit")
    return parser.parse_args(argv)


def check_resume(cfg: PretrainConfig) -> str | None:
    """Refuse to mix a new config into an old run's checkpoints; return the latest checkpoint if any."""
    return driver.check_resume(cfg, PRETRAIN_MEANING_KEYS)


def start_ray(cfg: PretrainConfig, address: str | None):
    """Attach to a cluster when an address is given, else start a private local Ray."""
    driver.start_ray(cfg, address)


block_dataset = driver.parquet_dataset


def build_datasets(prepared: dict) -> dict:
    """The Ray Data streams of the prepared blocks: {"train": ..., "val": ...} (val when held out)."""
    datasets = {"train": block_dataset(prepared["train_path"])}
    if prepared.get("val_path"):
        datasets["val"] = block_dataset(prepared["val_path"])
    return datasets


def build_trainer(cfg: PretrainConfig, prepared: dict, *, callbacks=(), storage_path: str | None = None,
                  name: str | None = None, datasets: dict | None = None, init_checkpoint: str | None = None):
    """A TorchTrainer whose workers run `training.pretrain_worker.train_loop_per_worker`.

    `callbacks` are added to the RunConfig (e.g. Tune's TuneReportCallback); `storage_path` and
    `name` override where the run lives (default: run.storage_path / run.name). `datasets` reuses
    streams built once (a sweep shares them across trials). `init_checkpoint`: a new run starts from
    another run's checkpoint (weights, optimizer moments, step) with this config's optimizer settings
    in effect (PBT); the run's own checkpoints, once it has some, win on resume.
    """
    from training.pretrain_worker import train_loop_per_worker

    loop_config = {"config": cfg.model_dump(mode="json"), "prepared": prepared, "init_checkpoint": init_checkpoint}
    return driver.torch_trainer(
        cfg, train_loop_per_worker, loop_config, datasets or build_datasets(prepared),
        callbacks=callbacks, storage_path=storage_path, name=name,
    )


def write_results(cfg: PretrainConfig, result, data_stats: dict) -> dict:
    """results.json and loss_curve.png in the run directory."""
    from training.tracking import plot_loss_curve, read_metrics

    records = read_metrics(cfg.run_dir)
    final = records[-1] if records else {}
    summary = {
        "run_dir": str(cfg.run_dir),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "final_step": final.get("step"),
        "final_loss": final.get("loss"),
        "final_val_loss": next((r["val_loss"] for r in reversed(records) if "val_loss" in r), None),
        "tokens_seen": final.get("tokens_seen"),
        "data": data_stats,
    }
    png = plot_loss_curve(records, cfg.run_dir / "loss_curve.png")
    summary["loss_curve"] = str(png) if png else None
    (cfg.run_dir / "results.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config_of_kind(args.config, args.set, "pretrain")
        resume_from = check_resume(cfg)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    if args.validate_only:
        print(f"{args.config}: valid")
        return 0

    from dataclasses import asdict

    from training.data import prepare_data

    try:
        prepared_data = prepare_data(cfg)
    except (OSError, ValueError) as err:  # missing files, bad rows, and permissions / a full disk
        print(driver.data_error_message(err), file=sys.stderr)
        return 2
    prepared = {k: v for k, v in asdict(prepared_data).items() if k != "stats"}
    data_stats = asdict(prepared_data.stats)
    try:
        driver.check_resume_data(resume_from, prepared["tokenizer_dir"])
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    if resume_from:
        print(f"[raylm] resuming {cfg.run_dir} from {resume_from}")

    driver.warn_relative_storage(cfg, args.address)
    start_ray(cfg, args.address)
    trainer = build_trainer(cfg, prepared)
    try:
        result = driver.fit_with_progress(cfg, trainer)
    except KeyboardInterrupt:
        return driver.INTERRUPTED
    if result is None:
        return 1
    summary = write_results(cfg, result, data_stats)
    print(f"[raylm] done: step {summary['final_step']}, loss {summary['final_loss']}, "
          f"val loss {summary['final_val_loss']}; skipped rows: {prepared_data.stats.skipped}")
    print(f"[raylm] checkpoint: {summary['checkpoint']}")
    print(f"[raylm] results: {cfg.run_dir / 'results.json'}  plot: {summary['loss_curve']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
