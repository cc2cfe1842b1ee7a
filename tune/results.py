"""What a sweep leaves behind: a table of trials, trials.csv / trials.json, plots, the best export."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from tune.trial import CURRENT_RUN_FILE, OWN_RUN


def _history(result, metric: str) -> list[tuple[int, float]]:
    """(step, metric) of every evaluation Tune received from the trial, in order."""
    df = result.metrics_dataframe
    if df is None or metric not in df or "step" not in df:
        return []
    rows = df[["step", metric]].dropna()
    return [(int(s), float(v)) for s, v in zip(rows["step"], rows[metric])]


def trial_rows(result_grid, sweep) -> list[dict]:
    """One row per trial, in the order Tune created them (`number`, from 0; trial ids are random):
    id, searched values, final and best metric, steps run, status, run dir.

    The order matters for a searcher that learns (Optuna TPE): trial n was proposed from the results
    of the trials before it.
    """
    metric, mode, max_steps = sweep.cfg.metric, sweep.cfg.mode, sweep.base.optim.max_steps
    rows = []
    for number, result in enumerate(result_grid):  # the ResultGrid lists trials as Tune created them
        trial_dir = Path(result.path)
        metrics = result.metrics or {}
        history = _history(result, metric)
        values = [v for _, v in history]
        best = (min if mode == "min" else max)(values) if values else None
        step = metrics.get("step")
        if result.error is not None:
            status = "error"
        elif not metrics.get("done"):
            # Tune marks a trial's last result done when the trial ended (run finished, scheduler stop);
            # without it the driver was interrupted while the trial ran (or before it started).
            status = "interrupted"
        elif step is not None and step >= max_steps:
            status = "completed"
        elif metrics.get("early_stopped"):
            status = "completed (run's early stopping)"
        else:
            status = "stopped early" if step is not None else "no result"
        run_file = trial_dir / CURRENT_RUN_FILE
        rows.append({
            "number": number,
            "trial": trial_dir.name,
            **{key: (result.config or {}).get(key) for key in sweep.space},
            metric: metrics.get(metric),
            f"best_{metric}": best,
            "steps": step,
            "status": status,
            "checkpoint": metrics.get("checkpoint_path"),
            "run_dir": str(trial_dir / (run_file.read_text().strip() if run_file.is_file() else OWN_RUN)),
            "history": history,
        })
    return rows


def ranking_key(sweep) -> str:
    """The row field trials are ranked by: what the checkpoint `best_checkpoint` exports scored.

    A fine-tune exports each run's best checkpoint by its selection metric, so when the sweep tunes that
    metric its trials compete with their best value (a trial whose loss rose after its best step still
    exports that step); otherwise, and for pretraining (its last checkpoint is exported), with the final one.
    """
    metric = sweep.cfg.metric
    if sweep.kind == "finetune" and metric == sweep.base.selection_metric[0]:
        return f"best_{metric}"
    return metric


def best_row(rows: list[dict], key: str, mode: str) -> dict | None:
    """The trial whose `key` (the final metric, or `best_<metric>`) is best; trials stopped early compete
    with what they reached."""
    scored = [r for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    if not scored:
        return None
    return (min if mode == "min" else max)(scored, key=lambda r: r[key])


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def format_table(rows: list[dict], columns: list[str], best: dict | None) -> str:
    """A plain-text table; the best trial is marked with '*'."""
    cells = [[("* " if r is best else "  ") + r["trial"]] + [_fmt(r.get(c)) for c in columns] for r in rows]
    header = ["  trial"] + columns
    widths = [max(len(h), *(len(row[i]) for row in cells)) if cells else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_tables(rows: list[dict], columns: list[str], sweep_dir: Path) -> tuple[Path, Path]:
    """trials.csv (one line per trial) and trials.json (rows with their metric history)."""
    csv_path, json_path = sweep_dir / "trials.csv", sweep_dir / "trials.json"
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["trial", *columns, "checkpoint", "run_dir"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps(rows, indent=2, default=str))
    return csv_path, json_path


def plot_sweep(rows: list[dict], sweep, sweep_dir: Path) -> list[Path]:
    """metric_vs_step.png (every trial) and params_vs_metric.png (each searched key vs final metric)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = sweep.cfg.metric
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for row in rows:
        if row["history"]:
            ax.plot(*zip(*row["history"]), "o-", markersize=3, linewidth=1.2, label=row["trial"])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.set_title(f"{sweep.cfg.name}: {metric} of every trial")
    ax.grid(alpha=0.3)
    if 0 < len(rows) <= 12 and any(r["history"] for r in rows):
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(sweep_dir / "metric_vs_step.png")
    fig.savefig(paths[-1])
    plt.close(fig)

    keys = list(sweep.space)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.6), dpi=110, squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(r[key], r[metric]) for r in rows if r.get(metric) is not None and r.get(key) is not None]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, _ in points)
        if points and numeric:
            ax.scatter(*zip(*points))
            if sweep.space[key].kind == "loguniform":
                ax.set_xscale("log")
        elif points:
            labels = sorted({str(x) for x, _ in points})
            ax.scatter([labels.index(str(x)) for x, _ in points], [y for _, y in points])
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(key)
        ax.set_ylabel(f"final {metric}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(sweep_dir / "params_vs_metric.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    return paths


def best_checkpoint(best: dict, kind: str) -> Path:
    """The checkpoint of the best trial that gets exported, picked as `training.export` picks it.

    Pretraining: the trial's last checkpoint Tune saw (its final metric is what ranked it). Fine-tuning:
    the checkpoint the run itself recorded as best by its selection metric, what `python -m
    training.export <run_dir>` exports and `--publish-to` publishes.
    """
    from training.export import find_checkpoint

    if kind == "finetune":
        return find_checkpoint(Path(best["run_dir"]), "best")
    return Path(best["checkpoint"]) if best.get("checkpoint") else find_checkpoint(Path(best["run_dir"]))


def export_best(best: dict, out_dir: Path, kind: str = "pretrain") -> dict:
    """Export the best trial (a fine-tune: merged) with training.export and re-read it with serving's reader."""
    from serving.export_format import read_export
    from training.export import export_checkpoint

    manifest = export_checkpoint(best_checkpoint(best, kind), out_dir)
    read_export(out_dir)  # the contract with serving: fails loudly if the export is not servable
    return manifest


def publish_best(best: dict, adapters_dir: Path, name: str) -> dict:
    """Publish the best trial's LoRA adapter into a served adapters directory, as `training.export
    --publish-to` does: staged hidden in that directory, checked with serving's read_adapter, renamed
    into place; then read back once more with serving's reader."""
    from serving.export_format import read_adapter
    from training.finetune_export import publish_adapter

    manifest = publish_adapter(best_checkpoint(best, "finetune"), adapters_dir, name)
    read_adapter(manifest["path"])
    return manifest
