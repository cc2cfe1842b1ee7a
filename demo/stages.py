"""The demo's training stages, each run by the project's own entry point and cached by a fingerprint.

A stage's record (`<workdir>/stages/<stage>.json`: fingerprint + result) is written only when the stage
finished; a rerun whose stage config has the same fingerprint reuses the result instead of training
again. Run and sweep directories are named by the fingerprint, so a changed config never lands on (or
is refused by) an old run.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from demo.config import Plan, load_sweep_of


class StageFailed(RuntimeError):
    """A stage's entry point returned an error code; its own output above says why."""


INTERRUPTED = 130  # what the entry points return after a Ctrl-C they handled themselves


def check_exit(rc: int, what: str) -> None:
    if rc == INTERRUPTED:
        raise KeyboardInterrupt
    if rc != 0:
        raise StageFailed(f"{what} failed (see above)")


def run_entry_point(main, argv: list[str], what: str) -> None:
    """`main(argv)` of a stage's entry point, with the demo's own Ctrl-C handling put back afterwards.

    Ray Tune's Tuner.fit() leaves its SIGINT handler installed after a sweep that ran to its end; a later
    Ctrl-C (while the endpoint deploys, say) would only set a flag nobody reads instead of stopping the demo.
    """
    import signal

    handler = signal.getsignal(signal.SIGINT)
    try:
        rc = main(argv)
    finally:
        signal.signal(signal.SIGINT, handler)
    check_exit(rc, what)


def fingerprint(*parts) -> str:
    """sha256 of the parts as canonical JSON (first 10 hex digits: enough to tell configs apart)."""
    blob = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:10]


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cached(demo_plan: Plan, stage: str, key: str) -> dict | None:
    """The recorded result of `stage` if it finished with this fingerprint (and its artifacts still exist)."""
    path = demo_plan.workdir / "stages" / f"{stage}.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("fingerprint") != key:
        return None
    if not all(Path(p).exists() for p in record.get("artifacts", [])):
        return None
    return record["result"]


def record(demo_plan: Plan, stage: str, key: str, result: dict, artifacts: list[str]) -> dict:
    path = demo_plan.workdir / "stages" / f"{stage}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.tmp")
    staged.write_text(json.dumps({"fingerprint": key, "result": result, "artifacts": artifacts}, indent=2,
                                 ensure_ascii=False, default=str), encoding="utf-8")
    staged.replace(path)
    return result


# --------------------------------------------------------------------------------------------
# Stage 1: pretraining


def pretrain(demo_plan: Plan) -> dict:
    """Run (or reuse) the short pretraining; returns its figures and the metric records for the plot."""
    from training import pretrain as pretrain_cli
    from training.config import load_config_of_kind
    from training.tracking import read_metrics

    cfg = load_config_of_kind(demo_plan.pretrain_config, demo_plan.pretrain_set, "pretrain")
    key = fingerprint(cfg.model_dump(mode="json", exclude={"run": {"name", "storage_path"}}))
    run_name = f"{cfg.run.name}-{key}"
    run_dir = Path(cfg.run.storage_path).expanduser().resolve() / run_name
    result = cached(demo_plan, "pretrain", key)
    if result is None:
        argv = ["--config", str(demo_plan.pretrain_config)]
        for item in [*demo_plan.pretrain_set, f"run.name={run_name}"]:
            argv += ["--set", item]
        run_entry_point(pretrain_cli.main, argv, "pretraining")
        summary = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
        val_loss = summary.get("final_val_loss")
        result = record(demo_plan, "pretrain", key, {
            "run_dir": str(run_dir), "checkpoint": summary["checkpoint"], "loss_curve": summary.get("loss_curve"),
            "steps": summary["final_step"], "final_loss": summary["final_loss"], "final_val_loss": val_loss,
            "val_perplexity": math.exp(val_loss) if val_loss is not None else None,
            "tokens_seen": summary.get("tokens_seen")}, [str(run_dir / "results.json")])
    else:
        print(f"[demo] reusing pretraining run {result['run_dir']} (same config fingerprint {key})")
    result["records"] = read_metrics(result["run_dir"])  # for the summary plot
    return result


# --------------------------------------------------------------------------------------------
# Stage 2: the base model, the task data, the fine-tuning sweep


def base_model(demo_plan: Plan) -> dict:
    """The served base model as a raylm export (a GGUF is exported once into the workdir)."""
    from serving.export_format import read_export

    cfg = demo_plan.cfg.base_model
    if cfg.source == "gguf":
        from demo.base_model import export_gguf

        if not (demo_plan.base_export / "raylm.json").is_file():
            print(f"[demo] exporting {cfg.path} as fp32 safetensors -> {demo_plan.base_export} (once)", flush=True)
        export_gguf(cfg.path, demo_plan.base_export, cfg.name, cfg.max_seq_len)
    export = read_export(demo_plan.base_export)
    return {"export_dir": str(demo_plan.base_export), "model_name": export.manifest.model_name,
            "manifest_sha256": file_digest(demo_plan.base_export / "raylm.json")}


def task_data(demo_plan: Plan) -> dict:
    """The sentiment chat rows (train) and the held-out reviews, rebuilt only when their settings change."""
    from demo.sentiment_data import build_task_data

    settings = demo_plan.cfg.task_data.model_dump()
    key = fingerprint(settings)
    result = cached(demo_plan, "task_data", key)
    if result is None:
        result = record(demo_plan, "task_data", key, build_task_data(demo_plan.data_dir, **settings),
                        [str(demo_plan.train_file), str(demo_plan.held_out_file)])
    return result


def sweep(demo_plan: Plan, base: dict) -> dict:
    """Run (or reuse) the LoRA fine-tuning sweep and publish its best adapter; returns the sweep's figures."""
    from tune import search

    loaded = load_sweep_of(demo_plan)
    key = fingerprint(loaded.cfg.model_dump(mode="json", exclude={"storage_path", "name"}),
                      loaded.base.model_dump(mode="json", exclude={"run": {"storage_path"}}),
                      base["manifest_sha256"], file_digest(demo_plan.train_file))
    sweep_name = f"{loaded.cfg.name}-{key}"
    sweep_dir = loaded.sweep_dir.parent / sweep_name
    adapters_dir = demo_plan.adapters_root / key  # the app's adapters_dir: this sweep's adapter only
    adapter = adapters_dir / demo_plan.cfg.sweep.adapter_name
    result = cached(demo_plan, "sweep", key)
    if result is not None:
        print(f"[demo] reusing sweep {sweep_dir} and its adapter {adapter} (same config fingerprint {key})")
        return result
    adapters_dir.mkdir(parents=True, exist_ok=True)
    argv = ["--config", str(demo_plan.sweep_config), "--set", f"name={sweep_name}"]
    for item in demo_plan.sweep_set:
        argv += ["--set", item]
    for item in demo_plan.sweep_set_base:
        argv += ["--set-base", item]
    if (sweep_dir / search.SWEEP_FILE).is_file():
        argv.append("--resume")  # an earlier demo run was interrupted in this very sweep
    if not adapter.exists():
        argv += ["--publish-to", str(adapters_dir), "--adapter-name", demo_plan.cfg.sweep.adapter_name]
    run_entry_point(search.main, argv, "the fine-tuning sweep")
    if not adapter.is_dir():
        raise StageFailed(f"the sweep published no adapter at {adapter} (no trial reported {loaded.cfg.metric}?)")
    return record(demo_plan, "sweep", key, sweep_figures(sweep_dir, loaded.cfg.metric, loaded.cfg.mode, adapter),
                  [str(adapter), str(sweep_dir / "trials.json")])


def sweep_figures(sweep_dir: Path, metric: str, mode: str, adapter: Path) -> dict:
    """Best and worst trial by the sweep metric, each trial's history, and where the adapter went."""
    trials = json.loads((sweep_dir / "trials.json").read_text(encoding="utf-8"))
    scored = [t for t in trials if t.get(f"best_{metric}") is not None]
    ordered = sorted(scored, key=lambda t: t[f"best_{metric}"], reverse=(mode == "max"))
    return {"sweep_dir": str(sweep_dir), "metric": metric, "mode": mode, "adapter": str(adapter),
            "adapters_dir": str(adapter.parent), "trials": trials,
            "best": ordered[0] if ordered else None, "worst": ordered[-1] if ordered else None,
            "plots": sorted(str(p) for p in sweep_dir.glob("*.png"))}
