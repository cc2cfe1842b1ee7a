"""What a sweep may search and schedule over its base run: the keys a trial cannot change, each sampled
value checked against the run config's own validation, ASHA rungs on evaluation steps, PBT mutating only
numeric optimizer settings, and what each search algorithm can enumerate. `tune.config.validate_sweep`
reports these problems together with the schema's. Imports without torch or ray.
"""

from __future__ import annotations

import difflib
import math
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from training.config import format_validation_error
from training.finetune_config import TASK_METRICS
from tune.space import Distribution, parse_distribution

if TYPE_CHECKING:
    from tune.config import SweepConfig

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


def evaluation_metrics(base) -> dict[str, str]:
    """The metrics a run of this base reports at its evaluations, each with its better direction."""
    if getattr(base, "kind", "pretrain") == "finetune":
        return TASK_METRICS[base.task]
    return PRETRAIN_METRICS


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


def check_space(space_raw: dict, base_raw: dict, base, base_cls) -> tuple[dict[str, Distribution], list[str]]:
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


def check_scheduler(cfg: "SweepConfig", base, space: dict[str, Distribution], base_cls) -> list[str]:
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
