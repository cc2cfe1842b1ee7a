"""raylm's Prometheus alert rules: one definition, written as a PrometheusRule and as a plain rules file.

    python -m cluster.alerts                                   # rewrite both files with the defaults
    python -m cluster.alerts --set serving_p99_latency_seconds=10 --set training_stall_minutes=30 \\
        --out-dir my-alerts/                                    # your thresholds, your files

The rules watch what raylm and Ray already export on every node's metrics port: Ray Serve's proxy and
controller series (`ray_serve_*`), raylm's serving series (`ray_raylm_*`, serving/metrics.py) and the
training run's gauges (`ray_raylm_train_*`, training/run_metrics.py). Every rule has a `runbook`
annotation saying what to check. Written files:
  k8s/base/prometheus-rules.yaml            PrometheusRule (Prometheus Operator / kube-prometheus-stack)
  k8s/monitoring/raylm-alerts.rules.yaml    the same groups as a plain `rule_files:` entry
tests/test_k8s_alerts.py fails when a file differs from what this module writes, and runs
`promtool check rules` and `promtool test rules` on it.
"""

from __future__ import annotations

from cluster.requirements_check import check_requirements

check_requirements("cluster.alerts", run_as_main=__name__ == "__main__")  # before any third-party import

import argparse
import sys
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS_RULE_FILE = REPO / "k8s" / "base" / "prometheus-rules.yaml"
PLAIN_RULES_FILE = REPO / "k8s" / "monitoring" / "raylm-alerts.rules.yaml"
SERVE_KEYS = "ray_io_cluster, application"
DEPLOYMENT_KEYS = "ray_io_cluster, application, deployment"


class AlertThresholds(BaseModel):
    """What counts as a problem. Defaults suit the shipped serving and training configs."""

    model_config = ConfigDict(extra="forbid")

    serving_error_ratio: float = Field(0.05, gt=0, lt=1, description="Share of HTTP responses that are 5xx, over 5 minutes.")
    serving_p99_latency_seconds: float = Field(30.0, gt=0, description="p99 request latency (to the last byte), over 5 minutes.")
    serving_p99_ttft_seconds: float = Field(2.0, gt=0, description="p99 time to first token, over 5 minutes.")
    serving_429_ratio: float = Field(0.05, gt=0, lt=1, description="Share of responses that are 429 (queue full).")
    serving_extra_replica_starts: int = Field(2, ge=0, description="Replica starts in 30 min beyond the autoscaler's target.")
    training_stall_minutes: float = Field(20.0, gt=0, description="Minutes without a report from a running (unfinished) run.")
    training_checkpoint_age_minutes: float = Field(90.0, gt=0, description="Minutes since the run's last checkpoint.")
    training_divergence_factor: float = Field(1.5, gt=1, description="Loss above this multiple of its 1-hour minimum.")
    training_worker_failures: int = Field(2, ge=1, description="Worker-group failures of one run within 30 minutes.")


def _rule(alert: str, expr: str, for_: str, severity: str, summary: str, description: str, runbook: str) -> dict:
    return {
        "alert": alert,
        "expr": " ".join(expr.split()),
        "for": for_,
        "labels": {"severity": severity, "team": "raylm"},
        "annotations": {"summary": summary, "description": description, "runbook": runbook},
    }


def serving_rules(t: AlertThresholds) -> list[dict]:
    requests = "ray_serve_num_http_requests_total"
    return [
        _rule(
            "RaylmServingHighErrorRate",
            f"""sum by ({SERVE_KEYS}) (rate({requests}{{status_code=~"5.."}}[5m]))
              / sum by ({SERVE_KEYS}) (rate({requests}[5m])) > {t.serving_error_ratio:g}""",
            "5m", "critical",
            "Serve application {{ $labels.application }} answers more than "
            f"{t.serving_error_ratio:.0%} of requests with 5xx",
            "Share of HTTP 5xx responses from the Serve proxy over 5 minutes, cluster {{ $labels.ray_io_cluster }}.",
            "Check the replica logs (kubectl logs of the serving worker pods, or the Ray dashboard's Serve tab) for "
            "exceptions and OOM kills; ray_serve_deployment_replica_healthy and RaylmServeReplicasRestarting show dying "
            "replicas; a bad export or adapter fails every request (python -m training.export re-reads it).",
        ),
        _rule(
            "RaylmServingHighP99Latency",
            f"""histogram_quantile(0.99, sum by ({SERVE_KEYS}, le) (rate(ray_raylm_request_latency_seconds_bucket[5m])))
              > {t.serving_p99_latency_seconds:g}""",
            "10m", "warning",
            "p99 latency of {{ $labels.application }} above " f"{t.serving_p99_latency_seconds:g} s",
            "p99 time from request arrival to the last byte, over 5 minutes (raylm_request_latency_seconds).",
            "Check queueing (ray_raylm_queue_wait_seconds), batch sizes (ray_raylm_batch_size) and whether the "
            "autoscaler reached max_replicas (ray_serve_autoscaling_target_replicas); long max_tokens requests "
            "are slow by nature: compare with ray_raylm_generated_tokens_total.",
        ),
        _rule(
            "RaylmServingHighTimeToFirstToken",
            f"""histogram_quantile(0.99, sum by ({SERVE_KEYS}, le) (rate(ray_raylm_time_to_first_token_seconds_bucket[5m])))
              > {t.serving_p99_ttft_seconds:g}""",
            "10m", "warning",
            "p99 time to first token of {{ $labels.application }} above " f"{t.serving_p99_ttft_seconds:g} s",
            "p99 time from request arrival to the first generated token, over 5 minutes.",
            "Long prompts and full batches delay the first token: check ray_raylm_queue_wait_seconds, "
            "ray_raylm_prompt_tokens_total and the replicas' load (target_ongoing_requests); add replicas or "
            "lower max_batch_size.",
        ),
        _rule(
            "RaylmServingSustained429",
            f"""sum by ({SERVE_KEYS}) (rate({requests}{{status_code="429"}}[5m]))
              / sum by ({SERVE_KEYS}) (rate({requests}[5m])) > {t.serving_429_ratio:g}""",
            "15m", "warning",
            "{{ $labels.application }} rejects more than " f"{t.serving_429_ratio:.0%} of requests with 429",
            "Share of 429 responses (queues full: max_queued_requests) over 5 minutes, sustained for 15 minutes.",
            "The deployment is at capacity: check ray_serve_autoscaling_target_replicas against max_replicas and "
            "whether pending pods wait for nodes (kubectl get pods; the Ray autoscaler's logs); raise "
            "max_replicas or the worker group's maxReplicas.",
        ),
        _rule(
            "RaylmServeReplicasRestarting",
            f"""count by ({DEPLOYMENT_KEYS}) (ray_serve_deployment_replica_starts_total
                  unless ray_serve_deployment_replica_starts_total offset 30m)
              > on ({DEPLOYMENT_KEYS}) (max by ({DEPLOYMENT_KEYS})
                  (max_over_time(ray_serve_autoscaling_target_replicas[30m])) + {t.serving_extra_replica_starts})""",
            "0m", "warning",
            "Replicas of {{ $labels.deployment }} keep restarting",
            "More replicas started in 30 minutes than the autoscaler's target explains "
            f"(by more than {t.serving_extra_replica_starts}).",
            "Replicas die and are replaced: check the replica logs for exceptions, OOM kills (kubectl describe pod: "
            "OOMKilled) and failed health checks (ray_serve_health_check_failures_total); GPU memory and "
            "max_batch_size are the usual suspects.",
        ),
        _rule(
            "RaylmServeDeploymentUnhealthy",
            "ray_serve_deployment_status == 1 or ray_serve_deployment_status == 2",
            "5m", "critical",
            "Deployment {{ $labels.deployment }} is UNHEALTHY or DEPLOY_FAILED",
            "Ray Serve's deployment status (1 DEPLOY_FAILED, 2 UNHEALTHY) for 5 minutes.",
            "`serve status` (or the Ray dashboard's Serve tab; `kubectl describe rayservice`) gives the message: "
            "replicas failing their constructor (export missing or unreadable, API keys file missing), failing "
            "health checks, or no resources to place them.",
        ),
        _rule(
            "RaylmServeNoReplicaReady",
            f"""max by ({DEPLOYMENT_KEYS}) (ray_serve_autoscaling_target_replicas) > 0
              unless on ({DEPLOYMENT_KEYS}) (sum by ({DEPLOYMENT_KEYS}) (ray_serve_deployment_replica_healthy) > 0)""",
            "5m", "critical",
            "No healthy replica of {{ $labels.deployment }}",
            "The autoscaler wants replicas but none has passed its health check for 5 minutes: requests fail or wait.",
            "Check that serving worker pods are scheduled (kubectl get pods: Pending means no node or GPU), the "
            "replica logs for constructor errors, and the deployment status (RaylmServeDeploymentUnhealthy).",
        ),
    ]


def training_rules(t: AlertThresholds) -> list[dict]:
    running = "unless on (ray_io_cluster, run) (ray_raylm_train_step >= on (ray_io_cluster, run) ray_raylm_train_max_steps)"
    return [
        _rule(
            "RaylmTrainingStalled",
            f"""time() - ray_raylm_train_last_report_timestamp_seconds > {t.training_stall_minutes:g} * 60 {running}""",
            "0m", "critical",
            "Training run {{ $labels.run }} made no progress for " f"{t.training_stall_minutes:g} minutes",
            "No report (optimizer step) from an unfinished run.",
            "Check the Train workers' logs (ray job logs, or the worker pods) for a hang in a collective (NCCL/gloo "
            "timeout), a worker waiting for resources (ray status: pending placement group) or data loading; "
            "py-spy dump of a worker shows where it waits.",
        ),
        _rule(
            "RaylmTrainingLossNotFinite",
            "ray_raylm_train_loss_finite == 0",
            "0m", "critical",
            "Training run {{ $labels.run }} has a NaN or infinite loss",
            "The last report's training loss was NaN or inf.",
            "Lower optim.lr or raise warmup_steps, check the data for empty or corrupted rows, use bf16 instead of "
            "fp16; resume from the last checkpoint before the loss went bad (metrics.jsonl of the run).",
        ),
        _rule(
            "RaylmTrainingLossDiverging",
            f"""ray_raylm_train_loss > {t.training_divergence_factor:g} * min_over_time(ray_raylm_train_loss[1h])""",
            "15m", "warning",
            "Training loss of {{ $labels.run }} is diverging",
            f"Loss above {t.training_divergence_factor:g}x its minimum of the last hour, for 15 minutes.",
            "Check the learning rate schedule (lr in metrics.jsonl), grad_norm, and recent data (a shard of "
            "different text); lower optim.lr and resume from a checkpoint taken before the rise.",
        ),
        _rule(
            "RaylmTrainingCheckpointStale",
            f"""time() - ray_raylm_train_last_checkpoint_timestamp_seconds > {t.training_checkpoint_age_minutes:g} * 60 {running}""",
            "5m", "warning",
            "Training run {{ $labels.run }} has no checkpoint newer than " f"{t.training_checkpoint_age_minutes:g} minutes",
            "A failure now would lose that much training.",
            "Check run.checkpoint_every_steps against the step time (ray_raylm_train_tokens_per_second), free space "
            "and write errors on run.storage_path (the shared volume), and the job's logs around checkpoint writes.",
        ),
        _rule(
            "RaylmTrainingWorkersRestarting",
            f"""max_over_time(ray_raylm_train_worker_failures[30m]) - min_over_time(ray_raylm_train_worker_failures[30m])
              >= {t.training_worker_failures}""",
            "0m", "warning",
            "Workers of training run {{ $labels.run }} keep failing",
            f"At least {t.training_worker_failures} worker-group failures in 30 minutes; each restarts from the last checkpoint.",
            "Check the failed workers' logs for the exception (OOM kills: kubectl describe pod; CUDA errors; lost "
            "nodes: spot preemption); run.max_failures bounds the retries before the run fails.",
        ),
    ]


def rule_groups(thresholds: AlertThresholds | None = None) -> dict:
    """The rules as Prometheus `groups:` (the content of a rules file and of a PrometheusRule's spec)."""
    t = thresholds or AlertThresholds()
    return {
        "groups": [
            {"name": "raylm-serving", "interval": "30s", "rules": serving_rules(t)},
            {"name": "raylm-training", "interval": "30s", "rules": training_rules(t)},
        ]
    }


def prometheus_rule(thresholds: AlertThresholds | None = None) -> dict:
    """A monitoring.coreos.com/v1 PrometheusRule holding the groups (release label as in k8s/base/monitoring.yaml)."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "raylm-alerts", "labels": {"app.kubernetes.io/name": "raylm", "release": "prometheus"}},
        "spec": rule_groups(thresholds),
    }


HEADER = "# Generated by `python -m cluster.alerts` from cluster/alerts.py: edit that file (or pass --set), not this one.\n"


def render(doc: dict) -> str:
    return HEADER + yaml.safe_dump(doc, sort_keys=False, width=110, allow_unicode=True)


def write_files(thresholds: AlertThresholds, out_dir: Path | None) -> list[Path]:
    targets = (
        [(PROMETHEUS_RULE_FILE, prometheus_rule), (PLAIN_RULES_FILE, rule_groups)]
        if out_dir is None
        else [(out_dir / PROMETHEUS_RULE_FILE.name, prometheus_rule), (out_dir / PLAIN_RULES_FILE.name, rule_groups)]
    )
    for path, build in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(build(thresholds)), encoding="utf-8")
    return [path for path, _ in targets]


def parse_thresholds(overrides: list[str]) -> AlertThresholds:
    """Thresholds from KEY=VALUE overrides; raise ValueError naming every bad key or value."""
    values, problems = {}, []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            problems.append(f"--set {item!r}: expected KEY=VALUE")
        else:
            values[key.strip()] = yaml.safe_load(value)
    if not problems:
        try:
            return AlertThresholds.model_validate(values)
        except ValidationError as err:
            allowed = ", ".join(AlertThresholds.model_fields)
            for e in err.errors():
                key = ".".join(map(str, e["loc"]))
                hint = f"; known thresholds: {allowed}" if e["type"] == "extra_forbidden" else ""
                problems.append(f"--set {key}: {e['msg']} (got {e.get('input')!r}){hint}")
    raise ValueError("\n".join(problems))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.alerts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a threshold: " + ", ".join(f"{k} (default {f.default})" for k, f in AlertThresholds.model_fields.items()))
    parser.add_argument("--out-dir", type=Path, help="write both files here instead of k8s/")
    args = parser.parse_args(argv)
    try:
        thresholds = parse_thresholds(args.overrides)
    except ValueError as err:
        print(f"cluster.alerts: {err}", file=sys.stderr)
        return 2
    for path in write_files(thresholds, args.out_dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
