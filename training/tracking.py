"""Metrics out of a run: a JSONL log, a live progress line, TensorBoard, MLflow and a loss plot.

The Ray Train controller appends every report to `<run_dir>/metrics.jsonl` (durable: nothing
is lost if the driver dies); the driver tails that file to draw progress and feed trackers.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from ray.train.v2.api.callback import UserCallback

METRICS_FILE = "metrics.jsonl"
# Fine-tuning's task metrics (besides val_loss): shown in the progress line and plotted beside the loss.
TASK_METRIC_KEYS = ("val_accuracy", "val_macro_f1", "val_precision", "val_recall", "val_f1")


class MetricsLogCallback(UserCallback):
    """Runs in the Train controller: appends rank 0's metrics (and checkpoint path) as JSON lines, and
    sets the run's Prometheus gauges (training.run_metrics: step, loss, tokens/s, checkpoint age,
    worker failures) that the alert rules watch."""

    def __init__(self, run_dir: str):
        self.path = Path(run_dir) / METRICS_FILE
        self._gauges = None  # created in the controller, where they are set (not pickled from the driver)

    def __getstate__(self):
        return {**self.__dict__, "_gauges": None}

    def gauges(self):
        if self._gauges is None:
            from training.run_metrics import TrainRunGauges

            self._gauges = TrainRunGauges(self.path.parent.name)
        return self._gauges

    def after_report(self, run_context, metrics, checkpoint):
        record = dict(metrics[0]) if metrics else {}
        record["time"] = time.time()
        if checkpoint is not None:
            record["checkpoint"] = checkpoint.path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        self.gauges().on_report(record, checkpoint is not None, now=record["time"])

    def after_exception(self, run_context, worker_exceptions):
        self.gauges().on_worker_failure()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All records of a run, the latest record winning per step (resumed runs repeat steps)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if "step" in rec and not rec.get("already_complete"):
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def format_progress(rec: dict, started: float, first_step: int) -> str:
    """'step 40/200 | loss 5.123 | val 5.3 | 12,345 tok/s | 2 workers | ETA 1m20s'."""
    step, total = rec["step"], rec.get("max_steps", 0)
    elapsed = time.time() - started
    done = max(1, step - first_step)
    eta = elapsed / done * max(0, total - step)
    parts = [f"step {step}/{total}", f"loss {rec['loss']:.4f}"]
    if "val_loss" in rec:
        ppl = f" (ppl {rec['val_perplexity']:.1f})" if "val_perplexity" in rec else ""
        parts.append(f"val {rec['val_loss']:.4f}{ppl}")
    parts += [f"{key[4:]} {rec[key]:.4f}" for key in TASK_METRIC_KEYS if key in rec]
    parts += [f"lr {rec['lr']:.2e}", f"{rec.get('tokens_per_s', 0):,.0f} tok/s"]
    if "world_size" in rec:  # elastic runs change it: say how many workers made this step
        parts.append(f"{rec['world_size']} worker{'s' if rec['world_size'] != 1 else ''}")
    parts += [f"ETA {int(eta // 60)}m{int(eta % 60):02d}s"]
    return " | ".join(parts)


class ProgressMonitor:
    """Driver-side thread: tails metrics.jsonl, prints progress, writes TensorBoard and MLflow."""

    def __init__(self, run_dir: Path, config_dict: dict, mlflow_uri: str | None, poll_s: float = 1.0):
        self.run_dir, self.config_dict, self.mlflow_uri, self.poll_s = Path(run_dir), config_dict, mlflow_uri, poll_s
        self.path = self.run_dir / METRICS_FILE
        self._offset = self.path.stat().st_size if self.path.exists() else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raylm-progress", daemon=True)
        self._tb = None
        self._mlflow = None
        self._bar = None
        self._started = time.time()
        self._first_step: int | None = None

    def start(self) -> "ProgressMonitor":
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        if self.mlflow_uri:
            self._mlflow = _MlflowRun(self.mlflow_uri, self.run_dir.name, self.config_dict)
        self._thread.start()
        return self

    def stop(self, status: str = "FINISHED") -> None:
        self._stop.set()
        self._thread.join()  # the loop wakes at once; a slow final emit must finish before end_run
        self._drain()
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._mlflow is not None:
            self._mlflow.finish(status)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._drain()

    def _drain(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("r", encoding="utf-8") as fh:
            fh.seek(self._offset)
            chunk = fh.read()
        complete = chunk[: chunk.rfind("\n") + 1]  # leave a half-written line for next time
        self._offset += len(complete.encode("utf-8"))
        for line in complete.splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in rec:
                self._emit(rec)

    def _emit(self, rec: dict) -> None:
        step = rec["step"]
        if self._first_step is None:
            self._first_step = step - 1
            self._started = time.time() - rec.get("step_time_s", 0.0)
        scalars = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        for key, value in scalars.items():
            self._tb.add_scalar(f"train/{key}" if not key.startswith("val_") else f"val/{key[4:]}", value, step)
        self._tb.flush()
        if self._mlflow is not None:
            self._mlflow.log(scalars, step)
        line = format_progress(rec, self._started, self._first_step)
        if sys.stdout.isatty():
            if self._bar is None:
                from tqdm import tqdm

                # disable=False: TQDM_DISABLE (training.console) is for other libraries' bars, not this one.
                self._bar = tqdm(total=rec.get("max_steps"), initial=self._first_step, unit="step", dynamic_ncols=True,
                                 disable=False)
            self._bar.n = step
            self._bar.set_description_str(line, refresh=True)
        else:
            print(f"[raylm] {line}", flush=True)


class _MlflowRun:
    """One MLflow run addressed by id (no implicit global 'active run' to leak into later runs)."""

    def __init__(self, uri: str, run_name: str, config_dict: dict):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise RuntimeError("run.mlflow_tracking_uri is set but mlflow is not installed: pip install 'raylm[mlflow]'") from None
        if uri.startswith("file:"):
            # MLflow 3 keeps the offline file store behind an explicit opt-in; a file: URI in the
            # run config is that opt-in.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(uri)
        experiment = self.client.get_experiment_by_name("raylm")
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("raylm")
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        for section, values in config_dict.items():
            if isinstance(values, dict):
                for key, value in values.items():
                    self.client.log_param(self.run_id, f"{section}.{key}", str(value)[:250])

    def log(self, scalars: dict, step: int) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now_ms, step) for k, v in scalars.items()])

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


def plot_loss_curve(records: list[dict], png_path: Path) -> Path | None:
    """Train (and validation) loss against step, as a PNG next to the results."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    task_keys = [k for k in TASK_METRIC_KEYS if any(k in r for r in records)]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", linewidth=1.2, markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(png_path.parent.name)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if task_keys:  # fine-tuning: the task metric on a second axis (0..1)
        ax2 = ax.twinx()
        for key in task_keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            ax2.plot(*zip(*points), "s--", label=key, linewidth=1.0, markersize=3)
        ax2.set_ylabel("task metric")
        ax2.set_ylim(0, 1.02)
        extra_h, extra_l = ax2.get_legend_handles_labels()
        handles, labels = handles + extra_h, labels + extra_l
    ax.legend(handles, labels, loc="best")
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
