"""Search hyperparameters of a pretraining or fine-tuning run with Ray Tune: each trial a multi-worker DeepSpeed run.

    python -m tune.search --config configs/tune/tiny_asha_cpu.yaml
    python -m tune.search --config configs/tune/tiny_asha_cpu.yaml --resume        # after an interruption
    python -m tune.search --config configs/tune/tiny_asha_cpu.yaml --export-best exports/best
    python -m tune.search --config configs/tune/cls_minilm_lora_asha_cpu.yaml --publish-to /srv/adapters
    ray job submit --working-dir . -- python -m tune.search --config configs/tune/tiny_asha_cpu.yaml

Reads top to bottom as the algorithm: parse -> validate the sweep and its base run -> prepare data
once -> start/attach Ray -> derive how many trials fit -> build (or restore) the Tuner -> fit ->
table, CSV/JSON, plots -> export the best trial.
"""

from __future__ import annotations

from cluster.requirements_check import check_requirements

check_requirements("tune.search", run_as_main=__name__ == "__main__")  # before any third-party import

import argparse
import json
import math
import os
import sys
from pathlib import Path

from training.config import ConfigError, validate_config
from tune.config import DATA_RESERVE_CPU, Sweep, load_sweep, max_concurrent_trials

SWEEP_FILE = "sweep.json"  # the validated sweep as it started: --resume refuses a changed one


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tune.search", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="sweep YAML (kind: tune; see configs/tune/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a sweep key, e.g. --set num_samples=8 (repeatable)")
    parser.add_argument("--set-base", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the base run, e.g. --set-base optim.max_steps=40 (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted sweep: finished trials are kept, unfinished ones resume")
    parser.add_argument("--export-best", default=None, metavar="DIR", help="export the best trial's model here")
    parser.add_argument("--publish-to", default=None, metavar="ADAPTERS_DIR",
                        help="LoRA sweeps: publish the best adapter into this adapters directory")
    parser.add_argument("--adapter-name", default=None, metavar="NAME",
                        help="name of the published adapter under --publish-to (default: the sweep's name)")
    parser.add_argument("--address", default=None, help="Ray cluster (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--validate-only", action="store_true", help="check the sweep and exit")
    return parser.parse_args(argv)


def with_shared_data_dir(sweep: Sweep) -> Sweep:
    """Prepared data lives in the sweep directory (unless the base run names a prepared_dir)."""
    if not sweep.base.data.prepared_dir:
        sweep.base_raw.setdefault("data", {})["prepared_dir"] = str(sweep.sweep_dir / "data")
        sweep.base = validate_config(sweep.base_raw, type(sweep.base), sweep.source)
    return sweep


def check_sweep_dir(sweep: Sweep, resume: bool) -> None:
    """A new sweep must not land on an old one; --resume needs the old one and the same settings."""
    state = sweep.sweep_dir / SWEEP_FILE
    exists = state.is_file()
    if resume and not exists:
        raise ConfigError([f"--resume: {sweep.sweep_dir} holds no sweep to resume; drop --resume to start it"],
                          sweep.source)
    if not resume and exists:
        raise ConfigError([f"name: {sweep.sweep_dir} already holds sweep '{sweep.cfg.name}'; pass --resume to "
                           "continue it, or pick a new name"], sweep.source)
    if resume:
        saved = json.loads(state.read_text())
        current = describe(sweep)
        changed = [f"{key}: the interrupted sweep has {saved.get(key)!r}, the config now says {current[key]!r}; "
                   "restore it (or start a new sweep under another name)"
                   for key in ("sweep", "base") if saved.get(key) != current[key]]
        if changed:
            raise ConfigError(changed, f"--resume of {sweep.sweep_dir}")


def check_publish(sweep: Sweep, adapters_dir: str, name: str) -> None:
    """--publish-to needs a LoRA fine-tuning sweep, an existing adapters directory and a free adapter name."""
    if sweep.kind != "finetune" or sweep.base.method.type != "lora":
        what = f"a {sweep.kind} run" if sweep.kind != "finetune" else f"a {sweep.base.method.type} fine-tune"
        raise ConfigError([f"--publish-to: {adapters_dir}: publishing needs a LoRA fine-tuning sweep; this sweep "
                           f"is {what} (use --export-best DIR)"], sweep.source)
    problems = []
    target = Path(adapters_dir).expanduser()
    if not target.is_dir():
        problems.append(f"--publish-to: {adapters_dir} is not a directory; give the served adapters directory "
                        "(it must exist)")
    elif (target / name).exists():
        problems.append(f"--adapter-name: {target / name} already exists; pick another name (nothing is overwritten)")
    if problems:
        raise ConfigError(problems, sweep.source)


def describe(sweep: Sweep) -> dict:
    return {"sweep": sweep.cfg.model_dump(mode="json", exclude={"export"}), "base": sweep.base.model_dump(mode="json")}


def start_ray(sweep: Sweep, address: str | None) -> None:
    """Attach to a cluster, or start a local Ray sized for at least one trial plus Ray Data."""
    from training.console import DRIVER_LOG
    from training.driver import connect_ray

    trial_cpu = sweep.trial_resources().get("CPU", 0.0)
    connect_ray(sweep.sweep_dir / DRIVER_LOG, address,
                local_cpus=max(os.cpu_count() or 1, math.ceil(trial_cpu + DATA_RESERVE_CPU)))


def trial_dirname(trial) -> str:
    """Trial directories are `<sweep_dir>/<trial_id>/`: the trial function puts its run there too."""
    return trial.trial_id


def build_scheduler(sweep: Sweep):
    """Tune scheduler with `step` as the time attribute (metric/mode come from the TuneConfig)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s = sweep.cfg.scheduler
    if s.type == "asha":
        return ASHAScheduler(time_attr="step", max_t=sweep.max_t, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor, brackets=s.brackets)
    if s.type == "pbt":
        return PopulationBasedTraining(
            time_attr="step", perturbation_interval=s.perturbation_interval, burn_in_period=s.burn_in_period,
            hyperparam_mutations={k: d.to_pbt_mutation() for k, d in sweep.pbt_mutations.items()},
            quantile_fraction=s.quantile_fraction, resample_probability=s.resample_probability,
            perturbation_factors=tuple(s.perturbation_factors), synch=s.synch)
    return FIFOScheduler()


def build_search(sweep: Sweep, concurrency: int):
    """Random/grid: Tune's variant generator; optuna: TPE over the same space; both capped at `concurrency`.

    The cap lives here because Tune ignores TuneConfig.max_concurrent_trials for a variant generator.
    """
    s = sweep.cfg.search
    if s.type == "optuna":
        from optuna.samplers import TPESampler
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        sampler = TPESampler(seed=s.seed, n_startup_trials=s.n_startup_trials)
        return ConcurrencyLimiter(OptunaSearch(sampler=sampler), max_concurrent=concurrency)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=getattr(s, "seed", None), max_concurrent=concurrency)


def build_trainable(sweep: Sweep, prepared: dict):
    """The trial function with the sweep's shared inputs bound, holding a sliver of CPU (Ray refuses 0).

    The prepared blocks are read into Ray Data once here and handed to every trial through the object
    store, instead of each trial re-reading the Parquet files.
    """
    from ray import tune

    from tune.config import TRIAL_FUNCTION_CPU
    from tune.runs import build_datasets
    from tune.trial import run_trial

    trainable = tune.with_parameters(run_trial, base_raw=sweep.base_raw, prepared=prepared,
                                     datasets=build_datasets(sweep.kind, prepared),
                                     metric=sweep.cfg.metric, report_checkpoints=sweep.cfg.scheduler.type == "pbt",
                                     sweep_dir=str(sweep.sweep_dir))
    return tune.with_resources(trainable, {"cpu": TRIAL_FUNCTION_CPU})


def build_tuner(sweep: Sweep, prepared: dict, concurrency: int, resume: bool):
    """A new Tuner over the space, or the interrupted one restored from the sweep directory."""
    from ray import tune

    from tune.progress import SweepProgress

    trainable = build_trainable(sweep, prepared)
    if resume:
        # Finished trials stay finished; unfinished ones restart and resume from their own last checkpoint.
        return tune.Tuner.restore(str(sweep.sweep_dir), trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)
    pbt = sweep.cfg.scheduler.type == "pbt"
    return tune.Tuner(
        trainable,
        param_space={key: dist.to_tune() for key, dist in sweep.space.items()},
        tune_config=tune.TuneConfig(
            metric=sweep.cfg.metric, mode=sweep.cfg.mode, num_samples=sweep.cfg.num_samples,
            scheduler=build_scheduler(sweep), search_alg=build_search(sweep, concurrency),
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=sweep.cfg.name, storage_path=str(sweep.sweep_dir.parent),
            failure_config=tune.FailureConfig(max_failures=sweep.cfg.max_failures),
            # PBT clones checkpoints between trials; keep enough that a clone source is never deleted early.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=4 if pbt else None),
            # raylm's own line per trial event instead of Tune's status table every 30 s (tune/progress.py;
            # main runs fit() in its sweep_console, where verbose=0 prints nothing of Tune's own).
            verbose=0,
            callbacks=[SweepProgress(sweep.cfg.metric, list(sweep.space), sweep.max_t)],
        ),
    )


def summarize(result_grid, sweep: Sweep) -> dict:
    """Table on stdout, trials.csv / trials.json / PNG plots in the sweep directory; returns the summary."""
    from tune.results import best_row, format_table, plot_sweep, ranking_key, trial_rows, write_tables

    metric = sweep.cfg.metric
    rows = trial_rows(result_grid, sweep)
    columns = [*sweep.space, metric, f"best_{metric}", "steps", "status"]
    ranked_by = ranking_key(sweep)
    best = best_row(rows, ranked_by, sweep.cfg.mode)
    print(f"[raylm-tune] {sweep.cfg.name}: {len(rows)} trials ({sweep.cfg.scheduler.type}, {sweep.cfg.search.type}), "
          f"{metric} ({sweep.cfg.mode}); * = best by {ranked_by}"
          + (" (each trial exports its best checkpoint)" if ranked_by != metric else ""))
    print(format_table(rows, columns, best))
    csv_path, json_path = write_tables(rows, columns, sweep.sweep_dir)
    plots = plot_sweep(rows, sweep, sweep.sweep_dir)
    summary = {"sweep_dir": str(sweep.sweep_dir), "best": best, "trials": len(rows), "csv": str(csv_path),
               "json": str(json_path), "plots": [str(p) for p in plots],
               "trial_steps": sum(r["steps"] or 0 for r in rows)}
    (sweep.sweep_dir / "best.json").write_text(json.dumps(best, indent=2, default=str))
    print(f"[raylm-tune] results: {csv_path}  {json_path}  plots: {', '.join(str(p) for p in plots)}")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sweep = with_shared_data_dir(load_sweep(args.config, args.set, args.set_base))
        check_sweep_dir(sweep, args.resume)
        publish_to = args.publish_to or sweep.cfg.export.publish_to
        adapter_name = args.adapter_name or sweep.cfg.name
        if publish_to:
            check_publish(sweep, publish_to, adapter_name)
        export_dir = args.export_best or sweep.cfg.export.best_dir
        if export_dir and Path(export_dir).exists() and any(Path(export_dir).iterdir()):
            raise ConfigError([f"--export-best: {export_dir} exists and is not empty; choose a new directory"],
                              sweep.source)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    if args.validate_only:
        print(f"{args.config}: valid; {len(sweep.space)} searched key(s), each trial holds {sweep.trial_resources()}")
        return 0

    from tune import runs

    try:
        prepared, _ = runs.prepare_data(sweep.base)  # once, on the driver: every trial reads the same files
    except runs.data_errors(sweep.kind) as err:
        print(runs.data_error_message(err), file=sys.stderr)
        return 2

    start_ray(sweep, args.address)
    import ray

    try:
        concurrency = max_concurrent_trials(sweep, ray.cluster_resources())
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    sweep.sweep_dir.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        (sweep.sweep_dir / SWEEP_FILE).write_text(json.dumps(describe(sweep), indent=2))
    print(f"[raylm-tune] {sweep.sweep_dir}: up to {concurrency} trial(s) at once, each {sweep.trial_resources()}")
    tuner = build_tuner(sweep, prepared, concurrency, args.resume)
    from tune.progress import sweep_console

    with sweep_console(sweep.sweep_dir):
        result_grid = tuner.fit()
    summary = summarize(result_grid, sweep)
    rows = json.loads(Path(summary["json"]).read_text())
    interrupted = [r["trial"] for r in rows if r["status"] == "interrupted"]
    if interrupted:
        print(f"[raylm-tune] interrupted with {len(interrupted)} trial(s) unfinished; continue with the same "
              f"command plus --resume", file=sys.stderr)
        return 130
    try:
        if export_dir and summary["best"]:
            from tune.results import export_best

            manifest = export_best(summary["best"], Path(export_dir), sweep.kind)
            print(f"[raylm-tune] exported best trial {summary['best']['trial']} (step {manifest['trained_steps']}) "
                  f"-> {export_dir}; serving's reader accepts it")
        if publish_to and summary["best"]:
            from tune.results import publish_best

            manifest = publish_best(summary["best"], Path(publish_to), adapter_name)
            print(f"[raylm-tune] published the adapter of best trial {summary['best']['trial']} (step "
                  f"{manifest['trained_steps']}) -> {manifest['path']}; serving's read_adapter accepts it")
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"[raylm-tune] export of the best trial failed: {err}; the sweep's results are in {sweep.sweep_dir} "
              f"(export a trial's run directory with python -m training.export)", file=sys.stderr)
        return 1
    errors = [r["trial"] for r in rows if r["status"] == "error"]
    if errors:
        print(f"[raylm-tune] {len(errors)} trial(s) failed: {', '.join(errors)}; see their directories",
              file=sys.stderr)
    return 1 if errors and not summary["best"] else 0


if __name__ == "__main__":
    sys.exit(main())
