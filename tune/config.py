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

import difflib
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, ValidationError, field_validator

from training.config import (
    ConfigError,
    _Section,
    apply_overrides,
    config_class_for,
    format_validation_error,
    read_yaml,
)
from training.finetune_config import TASK_METRICS
from tune.space import DISTRIBUTIONS, Distribution, parse_distribution  # noqa: F401 (re-exported)

# Keys a trial cannot change: the world size (ZeRO shards and the data slicing are fixed by it), where
# runs live (the sweep sets run.name/storage_path per trial), and what data preparation reads (data is
# prepared once on the driver for every trial).
FIXED_KEY_PREFIXES = {
    "scaling.num_workers": "runs cannot change world size (ZeRO shards and data slices are fixed by it); "
    "set it in the base run instead",
    "run.name": "the sweep names each trial's run itself",
    "run.storage_path": "every trial's run lives under the sweep's directory; set storage_path on the sweep",
    "run.resume": "the sweep decides when a trial resumes",
    "data.": "data is prepared once on the driver and shared by all trials; set it in the base run",
    "tokenizer.": "the tokenizer is built once on the driver with the data; set it in the base run",
}
# Fine-tuning adds what its data preparation and its exports are fixed by: the base model (its tokenizer
# encodes the data once on the driver), the task (the label set and the data columns) and the method
# (adapters and full weights export and publish differently; compare methods in separate sweeps).
FINETUNE_FIXED_KEY_PREFIXES = {
    "model.source": "the base model's tokenizer prepares the data once on the driver; sweep one base per sweep",
    "model.path": "the base model's tokenizer prepares the data once on the driver; sweep one base per sweep",
    "task": "the task fixes the prepared data and the labels; set it in the base run",
    "method.type": "adapters and full weights train, export and publish differently; run one sweep per method",
}
# PBT copies a checkpoint from one trial into another, so a mutation may only touch what a checkpoint
# does not fix: the optimizer's numeric knobs, not the network, the data position or the batch shape.
PBT_FROZEN_KEYS = {"optim.max_steps", "optim.micro_batch_size", "optim.grad_accum_steps"}
PRETRAIN_METRICS = {"val_loss": "min", "val_perplexity": "min"}
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


def evaluation_metrics(base) -> dict[str, str]:
    """The metrics a run of this base reports at its evaluations, each with its better direction."""
    if getattr(base, "kind", "pretrain") == "finetune":
        return TASK_METRICS[base.task]
    return PRETRAIN_METRICS


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


def field_info(model_cls: type[BaseModel], dotted: str):
    """(FieldInfo, None) for a dotted key of a run config class, or (None, problem naming the key)."""
    cls: Any = model_cls
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        fields = getattr(cls, "model_fields", None)
        if fields is None:
            return None, f"'{'.'.join(parts[:i])}' is a value, not a section"
        if part not in fields:
            guess = difflib.get_close_matches(part, list(fields), n=1)
            hint = f" Did you mean '{'.'.join(parts[:i] + [guess[0]])}'?" if guess else ""
            where = ".".join(parts[:i]) or "the run config"
            return None, f"unknown key.{hint} Keys of {where}: {', '.join(fields)}"
        info = fields[part]
        if i < len(parts) - 1:
            cls = info.annotation
    if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
        return None, "names a whole section; search one of its keys instead"
    return info, None


def _set_dotted(raw: dict, dotted: str, value) -> dict:
    import copy

    out = copy.deepcopy(raw)
    node = out
    for part in dotted.split(".")[:-1]:
        node = node.setdefault(part, {})
    node[dotted.split(".")[-1]] = value
    return out


def _method_problem(key: str, base) -> str | None:
    """A fine-tune's method settings are only searchable under that method (the run config would refuse them)."""
    if getattr(base, "kind", "pretrain") != "finetune" or not key.startswith("method."):
        return None
    method = base.method.type
    if key.startswith("method.lora.") and method != "lora":
        return (f"space.{key}: searches a LoRA setting but the base run's method.type is {method}; "
                "set method.type: lora in the base run, or drop this key")
    if key == "method.num_virtual_tokens" and method not in ("prompt_tuning", "prefix_tuning"):
        return (f"space.{key}: only prompt_tuning/prefix_tuning use virtual tokens (the base run's method.type "
                f"is {method}); drop this key")
    if key == "method.prompt_init_text" and method != "prompt_tuning":
        return f"space.{key}: only prompt_tuning initialises from text (method.type is {method}); drop this key"
    return None


def _check_space(space_raw: dict, base_raw: dict, base, base_cls) -> tuple[dict[str, Distribution], list[str]]:
    """Parse every distribution and check each sample bound against the run config's own validation."""
    fixed_keys = dict(FIXED_KEY_PREFIXES)
    if getattr(base, "kind", "pretrain") == "finetune":
        fixed_keys.update(FINETUNE_FIXED_KEY_PREFIXES)
    space, problems = {}, []
    for key, spec in space_raw.items():
        fixed = next((why for prefix, why in fixed_keys.items() if key == prefix or
                      (prefix.endswith(".") and key.startswith(prefix))), None)
        if fixed:
            problems.append(f"space.{key}: cannot be searched: {fixed}")
            continue
        info, problem = field_info(base_cls, key)
        if problem:
            problems.append(f"space.{key}: {problem}")
            continue
        if problem := _method_problem(key, base):
            problems.append(problem)
            continue
        try:
            dist = parse_distribution(key, spec)
        except ValueError as err:
            problems.append(str(err))
            continue
        space[key] = dist
        for value in dist.sample_points():
            try:
                base_cls.model_validate(_set_dotted(base_raw, key, value))
            except ValidationError as err:
                # The base run validates, so whatever fails now is this value's doing, even where the run
                # config words the problem under another key (a cross-field rule).
                found = format_validation_error(err, base_cls)
                refused = [p for p in found if key in p] or found
                problems.append(f"space.{key}: value {value!r} ({dist}) is refused by the run config: "
                                + " / ".join(refused))
    return space, problems


def asha_rungs(grace_period: int, reduction_factor: float, max_t: int, brackets: int = 1) -> list[float]:
    """The steps at which Ray's ASHA compares trials (`ray.tune.schedulers.async_hyperband._Bracket`):
    grace_period * reduction_factor^(k+s) for each bracket s, below max_t (a trial stops at max_t anyway)."""
    rungs = set()
    for s in range(brackets):
        count = int(math.log(max_t / grace_period) / math.log(reduction_factor) - s + 1)
        rungs.update(grace_period * reduction_factor ** (k + s) for k in range(count))
    return sorted(r for r in rungs if r < max_t)


def _evaluated(step: float, base) -> bool:
    """Whether a run of `base` evaluates (reports the tuned metric) at `step`; fine-tunes also at checkpoints."""
    run = base.run
    every = [run.eval_every_steps] + ([run.checkpoint_every_steps] if getattr(base, "kind", "") == "finetune" else [])
    return float(step).is_integer() and any(int(step) % e == 0 for e in every)


def _rung_problems(sched, base, max_t: int) -> list[str]:
    """ASHA decides at the first evaluation at or past each rung: a rung between evaluations lets every trial
    it would stop train on until the next evaluation. Rungs must fall on evaluation steps."""
    rungs = asha_rungs(sched.grace_period, sched.reduction_factor, max_t, sched.brackets)
    off = [r for r in rungs if not _evaluated(r, base)]
    if not off:
        return []
    every = base.run.eval_every_steps
    shown = ", ".join(f"{r:g}" for r in off)
    return [f"scheduler: ASHA rungs at step {shown} (grace_period {sched.grace_period} x reduction_factor "
            f"{sched.reduction_factor:g}^k) fall between the base run's evaluations (every {every} steps), so each "
            "trial ASHA stops there trains on to the next evaluation first; use a grace_period that is a multiple "
            f"of run.eval_every_steps={every} and a whole-number reduction_factor (rungs: "
            f"{', '.join(f'{r:g}' for r in rungs)})"]


def _check_scheduler(cfg: SweepConfig, base, space: dict[str, Distribution], base_cls) -> list[str]:
    """Scheduler and search settings that cannot work with this base run and space."""
    problems = []
    sched, run = cfg.scheduler, base.run
    kind = getattr(base, "kind", "pretrain")
    metrics = evaluation_metrics(base)
    if cfg.metric not in metrics:
        what = f"{base.task} fine-tune" if kind == "finetune" else f"{kind} run"
        problems.append(f"metric: {cfg.metric!r} is not reported at evaluations of a {what}; "
                        f"use one of {', '.join(metrics)}")
    elif cfg.mode != metrics[cfg.metric]:
        problems.append(f"mode: {cfg.mode!r} would search for the worst {cfg.metric}; it is better when "
                        f"{'lower' if metrics[cfg.metric] == 'min' else 'higher'}: use mode: {metrics[cfg.metric]}")
    if sched.type == "asha":
        max_t = sched.max_t or base.optim.max_steps
        if sched.grace_period >= max_t:
            problems.append(f"scheduler.grace_period: {sched.grace_period} must be below max_t={max_t} "
                            "(the base run's optim.max_steps unless scheduler.max_t is set)")
        if sched.grace_period < run.eval_every_steps and not _evaluated(sched.grace_period, base):
            problems.append(f"scheduler.grace_period: {sched.grace_period} is below base run.eval_every_steps="
                            f"{run.eval_every_steps}; trials report the metric only at evaluations")
        elif sched.grace_period < max_t:
            problems += _rung_problems(sched, base, max_t)
        if sched.max_t and sched.max_t > base.optim.max_steps:
            problems.append(f"scheduler.max_t: {sched.max_t} exceeds the base run's optim.max_steps={base.optim.max_steps}")
    if sched.type == "pbt":
        for key in sched.mutate or []:
            if key not in space:
                problems.append(f"scheduler.mutate: {key!r} is not a key of space; PBT mutates searched keys "
                                f"({', '.join(space)})")
        for key in sched.mutate or list(space):
            dist = space.get(key)
            if dist is None:
                continue
            info, _ = field_info(base_cls, key)
            annotation = getattr(info, "annotation", None)
            if key in PBT_FROZEN_KEYS or not key.startswith("optim.") or not dist.numeric or annotation is bool:
                why = ("is not numeric" if not dist.numeric or annotation is bool else
                       "is fixed by the checkpoint a trial restarts from (network, data position or batch shape)")
                problems.append(f"scheduler.mutate: {key} {why}; PBT can only perturb numeric optimizer "
                                "settings (optim.lr, optim.weight_decay, ...); list the others under scheduler.mutate "
                                "without it, or use asha")
        if sched.perturbation_interval % run.eval_every_steps:
            problems.append(f"scheduler.perturbation_interval: {sched.perturbation_interval} is not a multiple of "
                            f"base run.eval_every_steps={run.eval_every_steps}; decisions happen at evaluations")
        if run.eval_every_steps % run.checkpoint_every_steps:
            problems.append(f"base.run.eval_every_steps: {run.eval_every_steps} is not a multiple of "
                            f"run.checkpoint_every_steps={run.checkpoint_every_steps}; PBT needs a checkpoint at "
                            "every evaluation to clone from")
        population = cfg.num_samples * math.prod(len(d.args[0]) for d in space.values() if d.kind == "grid")
        if population < 2:
            problems.append(f"num_samples: PBT needs a population of at least 2 trials (this sweep starts {population})")
    grids = [k for k, d in space.items() if d.kind == "grid"]
    if cfg.search.type == "grid":
        others = [k for k, d in space.items() if d.kind != "grid"]
        if others:
            problems.append(f"search: grid search enumerates grid([...]) entries only; {', '.join(others)} "
                            "use other distributions (write them as grid([...]) or use search: {type: random})")
    if cfg.search.type == "optuna":
        lists = [k for k, d in space.items() if d.kind in ("choice", "grid")
                 and any(isinstance(v, (list, tuple, dict)) for v in d.args[0])]
        if lists:
            problems.append(f"search: optuna only samples numbers, strings and booleans; {', '.join(lists)} choose "
                            "among lists: use search: {type: random} (or grid)")
        if grids:
            problems.append(f"search: optuna cannot enumerate grid([...]) ({', '.join(grids)}); use choice([...])")
        if sched.type == "pbt":
            problems.append("search: optuna proposes configs itself; PBT mutates them: use search: {type: random}")
        try:
            import optuna  # noqa: F401
        except ImportError:
            problems.append("search: optuna is not installed; pip install 'raylm[tune]' or use "
                            "search: {type: random}")
    return problems


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

    space, problems = _check_space(cfg.space, base_raw, base, base_cls)
    problems += _check_scheduler(cfg, base, space, base_cls)
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
