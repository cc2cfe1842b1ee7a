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
import math
import os
import sys
from pathlib import Path

from training.checkpoints import list_checkpoints
from training.config import ConfigError, PretrainConfig, load_config, read_yaml

FORWARDED_ENV = ("TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE")
MATERIALIZE_MAX_BYTES = 256 * 2**20


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
    checkpoints = list_checkpoints(cfg.run_dir)
    if not checkpoints:
        return None
    if not cfg.run.resume:
        raise ConfigError([
            f"run.resume: false, but {cfg.run_dir} already holds {len(checkpoints)} checkpoint(s); "
            "pick a new run.name (or set resume: true to continue it)"
        ])
    saved_path = checkpoints[-1] / "resolved_config.yaml"
    if saved_path.is_file():
        saved = read_yaml(saved_path)
        current = cfg.model_dump(mode="json")
        # The shape of the network, the data and the sharding must match to load the shards.
        problems = [
            f"{section}.{key}: checkpoint has {saved[section].get(key)!r}, config now says {value!r}; "
            "restore it or pick a new run.name"
            for section in ("model", "data", "tokenizer", "deepspeed")
            for key, value in current[section].items()
            if section in saved and saved[section].get(key) != value
        ]
        if saved.get("scaling", {}).get("num_workers") != cfg.scaling.num_workers:
            problems.append(
                f"scaling.num_workers: checkpoint was written by {saved['scaling']['num_workers']} workers, "
                f"config now says {cfg.scaling.num_workers}; ZeRO shards need the same count"
            )
        if problems:
            raise ConfigError(problems, f"resume of {cfg.run_dir}")
    return str(checkpoints[-1])


def start_ray(cfg: PretrainConfig, address: str | None):
    """Attach to a cluster when an address is given, else start a private local Ray."""
    import ray

    if ray.is_initialized():  # embedded use (tests, notebooks): the caller owns the Ray instance
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env_vars.setdefault("TOKENIZERS_PARALLELISM", "false")
    if address:
        ray.init(address=address, runtime_env={"env_vars": env_vars} if env_vars else None)
        return
    per_worker_cpu = cfg.scaling.worker_resources.get("CPU", 1.0)
    # Ray Data's read tasks need a CPU slot of their own; with every core reserved by Train
    # workers the stream starves and the run hangs. One extra logical CPU keeps it moving.
    num_cpus = max(os.cpu_count() or 1, math.ceil(cfg.scaling.num_workers * per_worker_cpu) + 1)
    ray.init(address="local", num_cpus=num_cpus, runtime_env={"env_vars": env_vars}, include_dashboard=True,
             dashboard_host="127.0.0.1")


def block_dataset(parquet_path: str):
    """A Ray Data stream of packed blocks; small files are read once into the object store.

    Every rank iterates the whole (unsplit) stream, once per epoch. For a corpus of a few hundred
    MB, re-running the Parquet read for each rank and epoch costs more than the data itself, so
    it is materialized once; larger corpora stream from Parquet on every pass.
    """
    import ray.data

    dataset = ray.data.read_parquet(parquet_path)
    if os.path.getsize(parquet_path) <= MATERIALIZE_MAX_BYTES:
        dataset = dataset.materialize()
    return dataset


def build_trainer(cfg: PretrainConfig, prepared: dict):
    """A TorchTrainer whose workers run `training.loop.train_loop_per_worker`."""
    import ray.data
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from training.loop import FAULT_ENV, train_loop_per_worker
    from training.tracking import MetricsLogCallback

    # Ray Data's per-operator bars would drown raylm's own progress line in the driver log.
    ray.data.DataContext.get_current().enable_progress_bars = False
    datasets = {"train": block_dataset(prepared["train_path"])}
    if prepared.get("val_path"):
        datasets["val"] = block_dataset(prepared["val_path"])
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "prepared": prepared,
            "test_fault": os.environ.get(FAULT_ENV),
        },
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=cfg.scaling.worker_resources,
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=str(cfg.run_dir.parent),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            callbacks=[MetricsLogCallback(str(cfg.run_dir))],
        ),
        datasets=datasets,
        # Unsplit and order-preserving: each rank takes its slice of every global batch, so the
        # data order does not depend on timing and a restarted worker resumes exactly.
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
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
        cfg = load_config(args.config, args.set)
        resume_from = check_resume(cfg)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    if args.validate_only:
        print(f"{args.config}: valid")
        return 0

    from dataclasses import asdict

    from training.data import prepare_data
    from training.tracking import ProgressMonitor

    try:
        prepared_data = prepare_data(cfg)
    except (FileNotFoundError, ValueError) as err:
        print(f"data: {err}", file=sys.stderr)
        return 2
    prepared = {k: v for k, v in asdict(prepared_data).items() if k != "stats"}
    data_stats = asdict(prepared_data.stats)
    if resume_from:
        print(f"[raylm] resuming {cfg.run_dir} from {resume_from}")

    attached = args.address or os.environ.get("RAY_ADDRESS")
    if attached and not Path(cfg.run.storage_path).expanduser().is_absolute():
        print(f"[raylm] warning: run.storage_path {cfg.run.storage_path!r} is relative while attached to a cluster; "
              f"under `ray job submit` that is the job's temporary working directory ({cfg.run_dir}). "
              "Use an absolute path on storage every node sees (--set run.storage_path=/shared/runs).", file=sys.stderr)
    start_ray(cfg, args.address)
    trainer = build_trainer(cfg, prepared)
    monitor = ProgressMonitor(cfg.run_dir, cfg.model_dump(mode="json"), cfg.run.mlflow_tracking_uri).start()
    try:
        result = trainer.fit()
    except Exception as err:  # the run failed beyond max_failures: say so, keep what was saved
        monitor.stop(status="FAILED")
        print(f"[raylm] training failed: {err}\n[raylm] checkpoints kept in {cfg.run_dir}; rerun the "
              "same command to resume", file=sys.stderr)
        return 1
    monitor.stop()
    summary = write_results(cfg, result, data_stats)
    print(f"[raylm] done: step {summary['final_step']}, loss {summary['final_loss']}, "
          f"val loss {summary['final_val_loss']}; skipped rows: {prepared_data.stats.skipped}")
    print(f"[raylm] checkpoint: {summary['checkpoint']}")
    print(f"[raylm] results: {cfg.run_dir / 'results.json'}  plot: {summary['loss_curve']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
