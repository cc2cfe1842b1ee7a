"""Driver-side steps every run kind shares: resume checks, Ray start/attach, the TorchTrainer, fit.

Importable without side effects (no Ray started, no torch imported at module level), so
`tune/` and other callers can build trainers from the same functions the entry scripts use.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from training.checkpoints import list_checkpoints
from training.config import ConfigError, read_yaml

FORWARDED_ENV = ("TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE")
MATERIALIZE_MAX_BYTES = 256 * 2**20


def check_resume(cfg, shape_sections: Sequence[str]) -> str | None:
    """Refuse to mix a new config into an old run's checkpoints; return the latest checkpoint if any.

    `shape_sections` are the config sections that must match the checkpoint for its shards to load.
    """
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
        problems = []
        for section in shape_sections:
            if section not in saved:
                continue
            if not isinstance(current[section], dict):
                if saved[section] != current[section]:
                    problems.append(f"{section}: checkpoint has {saved[section]!r}, config now says "
                                    f"{current[section]!r}; restore it or pick a new run.name")
                continue
            problems += [
                f"{section}.{key}: checkpoint has {saved[section].get(key)!r}, config now says {value!r}; "
                "restore it or pick a new run.name"
                for key, value in current[section].items()
                if saved[section].get(key) != value
            ]
        if saved.get("scaling", {}).get("num_workers") != cfg.scaling.num_workers:
            problems.append(
                f"scaling.num_workers: checkpoint was written by {saved['scaling']['num_workers']} workers, "
                f"config now says {cfg.scaling.num_workers}; ZeRO shards need the same count"
            )
        if problems:
            raise ConfigError(problems, f"resume of {cfg.run_dir}")
    return str(checkpoints[-1])


def start_ray(cfg, address: str | None) -> None:
    """Attach to a cluster when an address is given, else start a private local Ray."""
    import ray

    if ray.is_initialized():  # embedded use (tests, notebooks, tune): the caller owns the Ray instance
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


def warn_relative_storage(cfg, address: str | None) -> None:
    attached = address or os.environ.get("RAY_ADDRESS")
    if attached and not Path(cfg.run.storage_path).expanduser().is_absolute():
        print(f"[raylm] warning: run.storage_path {cfg.run.storage_path!r} is relative while attached to a cluster; "
              f"under `ray job submit` that is the job's temporary working directory ({cfg.run_dir}). "
              "Use an absolute path on storage every node sees (--set run.storage_path=/shared/runs).", file=sys.stderr)


def parquet_dataset(parquet_path: str):
    """A Ray Data stream of prepared rows; small files are read once into the object store.

    Every rank iterates the whole (unsplit) stream, once per epoch. For data of a few hundred
    MB, re-running the Parquet read for each rank and epoch costs more than the data itself, so
    it is materialized once; larger data streams from Parquet on every pass.
    """
    import ray.data

    dataset = ray.data.read_parquet(parquet_path)
    if os.path.getsize(parquet_path) <= MATERIALIZE_MAX_BYTES:
        dataset = dataset.materialize()
    return dataset


def torch_trainer(
    cfg,
    train_loop,
    loop_config: dict,
    datasets: dict,
    *,
    callbacks: Sequence = (),
    storage_path: str | None = None,
    name: str | None = None,
    checkpoint_config=None,
):
    """A TorchTrainer for `train_loop` with raylm's scaling, failure, checkpoint and metrics-log settings.

    `callbacks` are added after raylm's MetricsLogCallback (e.g. Tune's TuneReportCallback);
    `storage_path` / `name` override the run's location (default: cfg.run_dir's parent and name).
    """
    import ray.data
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from training.loop import FAULT_ENV
    from training.tracking import MetricsLogCallback

    storage = storage_path or str(cfg.run_dir.parent)
    run_name = name or cfg.run.name
    # Ray Data's per-operator bars would drown raylm's own progress line in the driver log.
    ray.data.DataContext.get_current().enable_progress_bars = False
    return TorchTrainer(
        train_loop,
        train_loop_config={**loop_config, "test_fault": os.environ.get(FAULT_ENV)},
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=cfg.scaling.worker_resources,
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=checkpoint_config or CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            callbacks=[MetricsLogCallback(str(Path(storage) / run_name)), *callbacks],
        ),
        datasets=datasets,
        # Unsplit and order-preserving: each rank takes its slice of every global batch, so the
        # data order does not depend on timing and a restarted worker resumes exactly.
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
    )


def fit_with_progress(cfg, trainer):
    """trainer.fit() with the live progress line, TensorBoard and MLflow; None when the run failed."""
    from training.tracking import ProgressMonitor

    monitor = ProgressMonitor(cfg.run_dir, cfg.model_dump(mode="json"), cfg.run.mlflow_tracking_uri).start()
    try:
        result = trainer.fit()
    except Exception as err:  # the run failed beyond max_failures: say so, keep what was saved
        monitor.stop(status="FAILED")
        print(f"[raylm] training failed: {err}\n[raylm] checkpoints kept in {cfg.run_dir}; rerun the "
              "same command to resume", file=sys.stderr)
        return None
    monitor.stop()
    return result
