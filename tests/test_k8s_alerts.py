"""Alert rules (cluster/alerts.py -> k8s/base/prometheus-rules.yaml, k8s/monitoring/raylm-alerts.rules.yaml).

- The committed files are exactly what the generator writes (they cannot drift from each other).
- `promtool check rules` accepts them, and `promtool test rules` runs synthetic series through them: every
  rule fires on series that show its problem and stays silent on series that do not.
- Every metric the rules read is one that Ray, raylm's serving or raylm's training defines, and the
  training gauges really reach a real Ray node's metrics export port when the Train callback sets them.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from cluster.alerts import PLAIN_RULES_FILE, PROMETHEUS_RULE_FILE, AlertThresholds, parse_thresholds, prometheus_rule, render, rule_groups

REPO = Path(__file__).resolve().parents[1]
PROMTOOL_INSTALL = (
    "promtool is missing: run `make install-tools` (it extracts promtool from Debian's `prometheus` package: "
    "apt-get download prometheus && dpkg -x prometheus_*.deb x && cp x/usr/bin/promtool .venv/bin/), "
    "or put a promtool binary from prometheus.io on PATH"
)


def promtool() -> str:
    found = shutil.which("promtool") or (str(Path(sys.executable).with_name("promtool")) if Path(sys.executable).with_name("promtool").exists() else None)
    if found is None:
        pytest.fail(PROMTOOL_INSTALL)
    return found


def all_rules() -> dict[str, dict]:
    return {r["alert"]: r for g in rule_groups()["groups"] for r in g["rules"]}


# -------------------------------------------------------------------------------------------------
# One source, two files


def test_committed_rule_files_are_what_the_generator_writes():
    assert PROMETHEUS_RULE_FILE.read_text(encoding="utf-8") == render(prometheus_rule()), "run `python -m cluster.alerts`"
    assert PLAIN_RULES_FILE.read_text(encoding="utf-8") == render(rule_groups()), "run `python -m cluster.alerts`"
    assert yaml.safe_load(PROMETHEUS_RULE_FILE.read_text())["spec"] == yaml.safe_load(PLAIN_RULES_FILE.read_text())


def test_thresholds_are_parameters(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cluster.alerts", "--set", "serving_p99_latency_seconds=7.5", "--set", "training_stall_minutes=45",
         "--out-dir", str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    rules = {r["alert"]: r for g in yaml.safe_load((tmp_path / PLAIN_RULES_FILE.name).read_text())["groups"] for r in g["rules"]}
    assert rules["RaylmServingHighP99Latency"]["expr"].endswith("> 7.5")
    assert "> 45 * 60" in rules["RaylmTrainingStalled"]["expr"]
    assert (tmp_path / PROMETHEUS_RULE_FILE.name).is_file()
    bad = subprocess.run([sys.executable, "-m", "cluster.alerts", "--set", "serving_p99_latency_secs=3", "--set", "serving_error_ratio=2",
                          "--out-dir", str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "--set serving_p99_latency_secs: Extra inputs are not permitted" in bad.stderr and "serving_p99_latency_seconds" in bad.stderr
    assert "--set serving_error_ratio: Input should be less than 1" in bad.stderr


def test_every_rule_has_a_runbook_severity_and_summary():
    for name, rule in all_rules().items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert len(rule["annotations"]["runbook"]) > 60 and rule["annotations"]["summary"], name
    with pytest.raises(ValueError, match="known thresholds"):
        parse_thresholds(["nope=1"])


# -------------------------------------------------------------------------------------------------
# promtool


def test_promtool_checks_the_rules():
    for path in (PLAIN_RULES_FILE,):
        result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"SUCCESS: {len(all_rules())} rules found" in result.stdout


C = {"ray_io_cluster": "raylm-serve-abc", "application": "causal-lm"}
D = {**C, "deployment": "CausalLMServer"}
R = {"ray_io_cluster": "raylm-pretrain-xyz", "run": "llama-125m"}


def series(name: str, labels: dict, values: str) -> dict:
    return {"series": name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}", "values": values}


def requests(ok: str, status: str, bad: str) -> list[dict]:
    name = "ray_serve_num_http_requests_total"
    return [series(name, {**C, "route": "/v1/completions", "status_code": "200"}, ok),
            series(name, {**C, "route": "/v1/completions", "status_code": status}, bad)]


def histogram(name: str, bounds: list[str], full_from: str, minutes: int) -> list[dict]:
    """A histogram whose requests (10 a minute) all fall in the bucket `full_from` and above."""
    return [series(f"{name}_bucket", {**C, "route": "/v1/completions", "le": b},
                   f"0+10x{minutes}" if bounds.index(b) >= bounds.index(full_from) else f"0x{minutes}") for b in bounds]


def training(**gauges: str) -> list[dict]:
    defaults = {"step": "10x150", "max_steps": "100x150"}
    return [series(f"ray_raylm_train_{k}", R, v) for k, v in {**defaults, **gauges}.items()]


LAT = ["1", "5", "10", "30", "60", "+Inf"]
TTFT = ["0.5", "1", "2.5", "5", "+Inf"]
starts = "ray_serve_deployment_replica_starts_total"
target = series("ray_serve_autoscaling_target_replicas", D, "1x60")
# alert -> (eval time, labels of the alert, series that fire it, series that must not)
CASES = {
    "RaylmServingHighErrorRate": ("20m", C, requests("0+100x30", "500", "0+10x30"), requests("0+100x30", "500", "0+1x30")),
    "RaylmServingHighP99Latency": ("25m", C, histogram("ray_raylm_request_latency_seconds", LAT, "60", 40),
                                   histogram("ray_raylm_request_latency_seconds", LAT, "1", 40)),
    "RaylmServingHighTimeToFirstToken": ("25m", C, histogram("ray_raylm_time_to_first_token_seconds", TTFT, "5", 40),
                                         histogram("ray_raylm_time_to_first_token_seconds", TTFT, "0.5", 40)),
    "RaylmServingSustained429": ("30m", C, requests("0+100x40", "429", "0+20x40"), requests("0+100x40", "429", "0+1x40")),
    # 4 replicas started in the last 30 minutes against a target of 1 (+2 tolerated); then only 2.
    "RaylmServeReplicasRestarting": (
        "50m", D,
        [target, series(starts, {**D, "replica": "r0"}, "1x60")] + [series(starts, {**D, "replica": f"r{i}"}, f"_x{30 + 4 * i} 1x20") for i in range(1, 5)],
        [target, series(starts, {**D, "replica": "r0"}, "1x60")] + [series(starts, {**D, "replica": f"r{i}"}, f"_x{30 + 4 * i} 1x20") for i in range(1, 3)],
    ),
    "RaylmServeDeploymentUnhealthy": ("10m", D, [series("ray_serve_deployment_status", D, "6 6 2x20")],
                                      [series("ray_serve_deployment_status", D, "6 6 3 3 6x20")]),
    "RaylmServeNoReplicaReady": ("10m", D, [target, series("ray_serve_deployment_replica_healthy", {**D, "replica": "r0"}, "1 0x20")],
                                 [target, series("ray_serve_deployment_replica_healthy", {**D, "replica": "r0"}, "0 1x20")]),
    # Last report at t=0 and step 10 of 100: stalled at 30 min; reports every minute, or a finished run, are not.
    "RaylmTrainingStalled": ("30m", R, training(last_report_timestamp_seconds="0x40"),
                             training(last_report_timestamp_seconds="0+60x40")
                             + [series("ray_raylm_train_step", {**R, "run": "finished"}, "100x40"),
                                series("ray_raylm_train_max_steps", {**R, "run": "finished"}, "100x40"),
                                series("ray_raylm_train_last_report_timestamp_seconds", {**R, "run": "finished"}, "0x40")]),
    "RaylmTrainingLossNotFinite": ("10m", R, training(loss_finite="1 1 1 0x20"), training(loss_finite="1x20")),
    "RaylmTrainingLossDiverging": ("60m", R, training(loss="2x30 4x40"), training(loss="4-0.02x70")),
    "RaylmTrainingCheckpointStale": ("120m", R, training(last_checkpoint_timestamp_seconds="0x130"),
                                     training(last_checkpoint_timestamp_seconds="0+60x130")),
    "RaylmTrainingWorkersRestarting": ("10m", R, training(worker_failures="0 0 0 1 1 2x20"), training(worker_failures="0 0 0 1x20")),
}


def expected_alert(rule: dict, labels: dict) -> dict:
    def fill(text: str) -> str:
        return re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels.get(m[1], ""), text)

    return {"exp_labels": {**labels, **rule["labels"]}, "exp_annotations": {k: fill(v) for k, v in rule["annotations"].items()}}


def test_promtool_every_rule_fires_and_stays_silent(tmp_path):
    rules = all_rules()
    assert set(CASES) == set(rules), "every rule needs a firing and a silent case"
    tests = []
    for alert, (at, labels, firing, silent) in CASES.items():
        tests.append({"name": f"{alert} fires", "interval": "1m", "input_series": firing,
                      "alert_rule_test": [{"eval_time": at, "alertname": alert, "exp_alerts": [expected_alert(rules[alert], labels)]}]})
        tests.append({"name": f"{alert} silent", "interval": "1m", "input_series": silent,
                      "alert_rule_test": [{"eval_time": at, "alertname": alert, "exp_alerts": []}]})
    spec = tmp_path / "raylm-alerts.test.yaml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(PLAIN_RULES_FILE)], "evaluation_interval": "1m", "tests": tests}, sort_keys=False))
    result = subprocess.run([promtool(), "test", "rules", str(spec)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    assert "SUCCESS" in result.stdout


# -------------------------------------------------------------------------------------------------
# The metrics exist


def test_every_metric_in_the_rules_is_defined():
    import ray

    from training.run_metrics import EXPORTED_NAMES

    ray_dir = Path(ray.__file__).parent
    sources = [REPO / "serving" / "metrics.py"] + sorted((ray_dir / "serve" / "_private").rglob("*.py"))
    known = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in sources)
    known = known.replace('f"serve_num_{protocol_name}_requests"', '"serve_num_http_requests"')  # Ray names it per protocol
    for name, rule in all_rules().items():
        for metric in set(re.findall(r"\b(ray_[a-z0-9_]+)\b", rule["expr"])) - {"ray_io_cluster"}:  # a label
            if metric.startswith("ray_raylm_train_"):
                assert metric in EXPORTED_NAMES, f"{name}: {metric} is not a training gauge"
                continue
            base = re.sub(r"_(total|bucket|sum|count)$", "", metric.removeprefix("ray_"))
            assert f'"{base}"' in known, f"{name}: {metric} is not a metric Ray or raylm serving defines"


def _scrape(port: int, run: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name.startswith("ray_raylm_train_") and s.labels.get("run") == run}


def test_training_gauges_reach_the_metrics_port(local_ray, tmp_path):
    """MetricsLogCallback, in an actor as in the Train controller, sets the gauges the rules read; a real Ray
    node exports them on its metrics port (the session's shared Ray: tests/conftest.py, metrics pushed every second)."""
    import ray

    from training.run_metrics import EXPORTED_NAMES

    port = next(node["MetricsExportPort"] for node in ray.nodes() if node["Alive"])

    @ray.remote(num_cpus=0)
    class Controller:
        def __init__(self, run_dir: str):
            from training.tracking import MetricsLogCallback

            self.callback = MetricsLogCallback(run_dir)

        def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
            from ray.train import Checkpoint

            self.callback.after_report(None, [metrics], Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)

        def worker_failed(self) -> None:
            self.callback.after_exception(None, {0: RuntimeError("worker died")})

    run_dir = tmp_path / "gauges-run"
    (tmp_path / "ckpt").mkdir()
    controller = Controller.remote(str(run_dir))
    before = time.time()
    ray.get(controller.report.remote({"step": 10, "loss": 3.5, "tokens_per_s": 1000.0, "max_steps": 100}, None))
    ray.get(controller.report.remote({"step": 20, "loss": math.nan, "tokens_per_s": 1200.0, "max_steps": 100}, str(tmp_path / "ckpt")))
    ray.get(controller.worker_failed.remote())
    after = time.time()
    deadline, seen = time.monotonic() + 90, {}
    while time.monotonic() < deadline:
        seen = _scrape(port, "gauges-run")
        if seen.get("ray_raylm_train_worker_failures") == 1.0 and seen.get("ray_raylm_train_step") == 20.0:
            break
        time.sleep(0.25)
    assert set(seen) == set(EXPORTED_NAMES), seen
    assert seen["ray_raylm_train_step"] == 20 and seen["ray_raylm_train_max_steps"] == 100
    assert seen["ray_raylm_train_loss"] == 3.5, "the last finite loss stays"
    assert seen["ray_raylm_train_loss_finite"] == 0
    assert seen["ray_raylm_train_tokens_per_second"] == 1200
    assert before <= seen["ray_raylm_train_last_checkpoint_timestamp_seconds"] <= seen["ray_raylm_train_last_report_timestamp_seconds"] <= after
    # The JSONL log is still written as before.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20] and "checkpoint" in records[1]
