"""Typed sweep configuration (`kind: tune`): a base run, a search space over its dotted keys, a
scheduler and a search algorithm. Validated on the driver before Ray starts a single trial.

    kind: tune
    name: tiny-asha
    base: ../pretrain/tiny_cpu.yaml          # a run YAML (relative to this file), or the run inline
    space:
      optim.lr: loguniform(1e-4, 3e-2)
      optim.weight_decay: choice([0.0, 0.1])
    metric: val_loss
    mode: min
    num_samples: 4
    search: {type: random, seed: 0}
    scheduler: {type: asha, grace_period: 10, reduction_factor: 2}

Like `training.config`, this module imports without torch or ray: preflight and tests use it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Field, ValidationError, field_validator

from training.config import (
    ConfigError,
    _Section,
    apply_overrides,
    config_class_for,
    format_validation_error,
    read_yaml,
)
from tune.space import DISTRIBUTIONS, Distribution, parse_distribution  # noqa: F401 (re-exported)
from tune.sweep_checks import check_scheduler, check_space, evaluation_metrics

TRIAL_FUNCTION_CPU = 0.01  # Tune reserves this for the trial function; Ray refuses {"cpu": 0}
DATA_RESERVE_CPU = 1.0  # Ray Data needs a free CPU to feed workers, or the run hangs (cpu-stack-facts)


class FifoScheduler(_Section):
    """Run every trial to its end."""

    type: Literal["fifo"]


class AshaScheduler(_Section):
    """Asynchronous successive halving: at step grace_period * reduction_factor^k a trial worse than the
    top 1/reduction_factor of those that reached that step stops."""

    type: Literal["asha"]
    grace_period: int = Field(..., ge=1, description="Steps every trial runs before it can be stopped.")
    reduction_factor: float = Field(2.0, gt=1.0)
    max_t: int | None = Field(None, ge=1, description="Default: the base run's optim.max_steps.")
    brackets: int = Field(1, ge=1)


class PbtScheduler(_Section):
    """Population based training: every perturbation_interval steps, a trial in the bottom quantile
    restarts from a top trial's checkpoint with mutated hyperparameters."""

    type: Literal["pbt"]
    perturbation_interval: int = Field(..., ge=1, description="Steps between exploit/explore decisions.")
    burn_in_period: int = Field(0, ge=0)
    quantile_fraction: float = Field(0.25, gt=0.0, le=0.5)
    resample_probability: float = Field(0.25, ge=0.0, le=1.0)
    perturbation_factors: tuple[float, float] = (1.2, 0.8)
    mutate: list[str] | None = Field(None, description="Space keys PBT mutates; default: every key of the space.")
    synch: bool = Field(False, description="All trials pause at each perturbation (deterministic, slower).")


class RandomSearch(_Section):
    """Independent samples (grid() entries are crossed with them, as in Tune)."""

    type: Literal["random"]
    seed: int | None = None


class GridSearch(_Section):
    """Every combination of the grid() entries of the space, num_samples times."""

    type: Literal["grid"]


class OptunaSearch(_Section):
    """Optuna's TPE sampler proposes each new trial from the results so far."""

    type: Literal["optuna"]
    seed: int | None = None
    n_startup_trials: int = Field(
        10, ge=1, description="Trials sampled at random before TPE models the results (Optuna's default 10); "
        "lower it for small budgets, or TPE never gets to propose a trial.")


Scheduler = Annotated[Union[FifoScheduler, AshaScheduler, PbtScheduler], Field(discriminator="type")]
Search = Annotated[Union[RandomSearch, GridSearch, OptunaSearch], Field(discriminator="type")]


class ExportSection(_Section):
    """What to do with the best trial once the sweep ends (command-line flags override)."""

    best_dir: str | None = Field(None, description="Export the best trial's final checkpoint here (must not exist).")
    publish_to: str | None = Field(None, description="LoRA sweeps: publish the best adapter into this adapters dir.")


class SweepConfig(_Section):
    """A whole sweep. `base` is the run every trial starts from; `space` overrides its dotted keys."""

    kind: Literal["tune"]
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    storage_path: str | None = Field(None, description="Sweeps live in <storage_path>/<name>. Default: the base run's run.storage_path.")
    base: str | dict = Field(..., description="Path of a run YAML (relative to the sweep YAML), or the run config inline.")
    base_set: dict[str, Any] = Field(
        default_factory=dict,
        description="Dotted keys set on the base run for every trial (e.g. shorter trials: optim.max_steps: 5000).")
    space: dict[str, Any] = Field(..., min_length=1)
    metric: str = Field("val_loss", description="Default: the base run's selection metric (a fine-tune's "
                        "early-stopping metric, else its task's: val_loss / val_macro_f1 / val_f1), else val_loss.")
    mode: Literal["min", "max"] = Field("min", description="Default: the metric's better direction.")
    num_samples: int = Field(1, ge=1, description="Trials to sample (grid: repeats of the whole grid).")
    scheduler: Scheduler = FifoScheduler(type="fifo")
    search: Search = RandomSearch(type="random")
    max_concurrent_trials: int | None = Field(None, ge=1, description="Default: as many as the cluster holds.")
    max_failures: int = Field(0, ge=0, description="Tune-level retries of a failed trial (Train already retries workers).")
    export: ExportSection = ExportSection()

    @field_validator("storage_path")
    @classmethod
    def _no_uri(cls, value):
        if value and "://" in value:
            raise ValueError(f"storage_path: {value!r} is a URI; mount the bucket and give the mount's path")
        return value


class Sweep:
    """A validated sweep: the typed sweep config, the typed base run, and the parsed search space."""

    def __init__(self, cfg: SweepConfig, base, base_raw: dict, space: dict[str, Distribution], source: str):
        self.cfg, self.base, self.base_raw, self.space, self.source = cfg, base, base_raw, space, source

    @property
    def kind(self) -> str:
        return getattr(self.base, "kind", "pretrain")

    @property
    def sweep_dir(self) -> Path:
        root = self.cfg.storage_path or self.base.run.storage_path
        return Path(root).expanduser().resolve() / self.cfg.name

    @property
    def max_t(self) -> int:
        sched = self.cfg.scheduler
        return getattr(sched, "max_t", None) or self.base.optim.max_steps

    @property
    def pbt_mutations(self) -> dict[str, Distribution]:
        sched = self.cfg.scheduler
        if sched.type != "pbt":
            return {}
        return {k: self.space[k] for k in (sched.mutate or list(self.space))}

    def trial_resources(self) -> dict[str, float]:
        """What one trial holds: its workers, plus the trial function's sliver of CPU."""
        per_worker = self.base.scaling.worker_resources
        n = self.base.scaling.num_workers
        res = {k: v * n for k, v in per_worker.items()}
        res["CPU"] = res.get("CPU", 0.0) + TRIAL_FUNCTION_CPU
        return res


SWEEPABLE_KINDS = ("pretrain", "finetune")


def default_metric(base) -> tuple[str, str]:
    """(metric, mode) a sweep tunes when it names none: a fine-tune's own selection metric, else val_loss."""
    if getattr(base, "kind", "pretrain") == "finetune":
        return base.selection_metric
    return "val_loss", "min"


def run_config_class(raw: dict, source: str):
    """The typed class of a run YAML, picked by its `kind` (absent = pretrain) as training does."""
    kind = raw.get("kind", "pretrain")
    if kind not in SWEEPABLE_KINDS:
        raise ConfigError([f"base.kind: {kind!r} runs cannot be swept yet (sweepable: {', '.join(SWEEPABLE_KINDS)})"],
                          source)
    return config_class_for(raw, source)


def load_sweep(path: str | Path, overrides: list[str] | None = None, base_overrides: list[str] | None = None) -> Sweep:
    """Read and validate a sweep YAML and its base run; raise ConfigError listing every problem."""
    raw = apply_overrides(read_yaml(path), overrides)
    return validate_sweep(raw, str(path), Path(path).parent, base_overrides)


def validate_sweep(raw: dict, source: str, base_dir: Path, base_overrides: list[str] | None = None) -> Sweep:
    """Validate a raw sweep dict (`base` paths resolve against `base_dir`); ConfigError lists every problem."""
    try:
        cfg = SweepConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, SweepConfig), source) from None

    if isinstance(cfg.base, str):
        base_path = Path(cfg.base)
        if not base_path.is_absolute():
            candidates = [Path(base_dir) / base_path, base_path]
            base_path = next((p for p in candidates if p.is_file()), candidates[0])
        if not base_path.is_file():
            raise ConfigError([f"base: run config {cfg.base!r} not found (looked relative to {base_dir} "
                               "and the working directory)"], source)
        base_raw = read_yaml(base_path)
    else:
        base_raw = dict(cfg.base)
    base_raw = apply_overrides(base_raw, [f"{k}={json.dumps(v)}" for k, v in cfg.base_set.items()])
    base_raw = apply_overrides(base_raw, base_overrides)
    base_cls = run_config_class(base_raw, source)
    try:
        base = base_cls.model_validate(base_raw)
    except ValidationError as err:
        raise ConfigError([f"base.{p}" for p in format_validation_error(err, base_cls)], source) from None
    cfg = with_default_metric(cfg, raw, base)

    space, problems = check_space(cfg.space, base_raw, base, base_cls)
    problems += check_scheduler(cfg, base, space, base_cls)
    if problems:
        raise ConfigError(problems, source)
    return Sweep(cfg, base, base_raw, space, source)


def with_default_metric(cfg: SweepConfig, raw: dict, base) -> SweepConfig:
    """Fill what the sweep YAML left out: the metric (the base run's own selection metric: a fine-tune's
    early-stopping metric or its task's default, val_loss for pretraining) and the mode (that metric's
    better direction)."""
    if "metric" in raw:
        metric = cfg.metric
        mode = raw.get("mode") or evaluation_metrics(base).get(metric, cfg.mode)
    else:
        metric, default_mode = default_metric(base)
        mode = raw.get("mode") or default_mode
    return cfg.model_copy(update={"metric": metric, "mode": mode})


def max_concurrent_trials(sweep: Sweep, cluster: dict[str, float]) -> int:
    """How many trials the cluster holds at once; ConfigError when not even one fits.

    Tune reserves only the trial function's CPU; the trial's workers are requested later by its
    TorchTrainer. Starting more trials than the cluster holds leaves worker groups waiting until
    WorkerGroupStartupTimeoutError, so the count is derived here (and a CPU stays free for Ray Data).
    """
    need = sweep.trial_resources()
    fits = []
    problems = []
    for resource, amount in need.items():
        have = cluster.get(resource, 0.0) - (DATA_RESERVE_CPU if resource == "CPU" else 0.0)
        if amount > 0:
            count = math.floor(have / amount + 1e-9)
            fits.append(count)
            if count < 1:
                problems.append(
                    f"base.scaling: a trial needs {amount:g} {resource} ({sweep.base.scaling.num_workers} workers x "
                    f"{sweep.base.scaling.worker_resources.get(resource, 0):g}"
                    + (f" + {TRIAL_FUNCTION_CPU} for the trial function" if resource == "CPU" else "")
                    + f") but the cluster has {cluster.get(resource, 0.0):g}"
                    + (f" ({DATA_RESERVE_CPU:g} kept free for Ray Data)" if resource == "CPU" else "")
                    + "; lower scaling.num_workers or scaling.resources_per_worker, or use a bigger cluster")
    if problems:
        raise ConfigError(problems, sweep.source)
    holds = min(fits) if fits else 1
    wanted = sweep.cfg.max_concurrent_trials
    if wanted and wanted > holds:
        raise ConfigError([f"max_concurrent_trials: {wanted} trials need {wanted}x{need} but the cluster "
                           f"({cluster}) holds {holds}; lower it (or leave it unset)"], sweep.source)
    return wanted or holds
