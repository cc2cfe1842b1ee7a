"""A training run's progress as Prometheus gauges, for alerting (k8s/base/prometheus-rules.yaml).

Set from the Ray Train controller (tracking.MetricsLogCallback) with `ray.util.metrics`, so they appear on
every node's metrics export port next to Ray's own series, with Ray's `ray_` prefix:

    ray_raylm_train_step                              last reported optimizer step
    ray_raylm_train_max_steps                         the run's optim.max_steps (a finished run is not stalled)
    ray_raylm_train_loss                              last finite training loss
    ray_raylm_train_loss_finite                       1 while the loss is finite, 0 once it is NaN/inf
    ray_raylm_train_tokens_per_second                 training throughput of the last report window
    ray_raylm_train_last_report_timestamp_seconds     unix time of the last report (stall = now - this)
    ray_raylm_train_last_checkpoint_timestamp_seconds unix time of the last checkpoint (age = now - this);
                                                      the controller's first report until one is written
    ray_raylm_train_worker_failures                   worker-group failures seen by this controller

Gauges, not counters, so that the first failure of a run is visible to `max_over_time - min_over_time`
(a counter's first sample hides its first increment from `increase()`). Every series carries the tag
`run` (the run's name).
"""

from __future__ import annotations

import math
import time

METRIC_PREFIX = "raylm_train_"
GAUGES = {
    "step": "Last reported optimizer step of the run.",
    "max_steps": "optim.max_steps of the run.",
    "loss": "Last finite training loss (nats/token).",
    "loss_finite": "1 while the training loss is finite, 0 once a report had NaN or inf.",
    "tokens_per_second": "Training tokens per second over the last report window.",
    "last_report_timestamp_seconds": "Unix time of the run's last report.",
    "last_checkpoint_timestamp_seconds": "Unix time of the run's last checkpoint (first report until one is written).",
    "worker_failures": "Worker-group failures seen by the run's Train controller.",
}
# As they appear on the metrics export port (the alert rules and their tests use these).
EXPORTED_NAMES = [f"ray_{METRIC_PREFIX}{name}" for name in GAUGES]


class TrainRunGauges:
    """The gauges of one run; create it in the process that sets them (the Train controller)."""

    def __init__(self, run_name: str):
        from ray.util.metrics import Gauge

        self.tags = {"run": run_name}
        self.gauges = {name: Gauge(METRIC_PREFIX + name, description=text, tag_keys=("run",)) for name, text in GAUGES.items()}
        self.failures = 0
        self.reported = False

    def _set(self, name: str, value: float) -> None:
        self.gauges[name].set(float(value), tags=self.tags)

    def on_report(self, record: dict, has_checkpoint: bool, now: float | None = None) -> None:
        """Update from rank 0's metrics of one report."""
        now = time.time() if now is None else now
        if "step" in record:
            self._set("step", record["step"])
        if "max_steps" in record:
            self._set("max_steps", record["max_steps"])
        loss = record.get("loss")
        if isinstance(loss, (int, float)):
            finite = math.isfinite(loss)
            self._set("loss_finite", 1.0 if finite else 0.0)
            if finite:
                self._set("loss", loss)
        if isinstance(record.get("tokens_per_s"), (int, float)) and math.isfinite(record["tokens_per_s"]):
            self._set("tokens_per_second", record["tokens_per_s"])
        self._set("last_report_timestamp_seconds", now)
        if has_checkpoint or not self.reported:
            # Until the first checkpoint, its age counts from the controller's first report.
            self._set("last_checkpoint_timestamp_seconds", now)
        self.reported = True
        self._set("worker_failures", self.failures)

    def on_worker_failure(self) -> None:
        self.failures += 1
        self._set("worker_failures", self.failures)
