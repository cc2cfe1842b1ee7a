"""Shared helpers of the serving tests: a Ray instance per module, tiny exports, `serve run` of a config.

Every helper drives the real system: a local Ray, the `serve run` CLI on a real config file,
HTTP on 127.0.0.1. Ports: Serve HTTP 18000-18099, metrics export 18100-18199, HAProxy stats 18300-18399,
HAProxy metrics 18400-18499 and the head's fallback proxy 18500-18599 (metrics port + 200 / + 300 / + 400; the
session's shared Ray of tests/conftest.py, which `causal_lm_app_beside_training` deploys on, takes free ones).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "serving" / "configs"
API_KEYS = ("test-key-alpha", "test-key-beta")


# From a module's metrics port: HAProxy's stats page and exporter, and the head's fallback proxy (HAProxy's backup).
HAPROXY_STATS_OFFSET, HAPROXY_METRICS_OFFSET, FALLBACK_PROXY_OFFSET = 200, 300, 400
# RAYLM_TEST_REQUEST_PATH: "haproxy" (the default, as shipped) or "python" (alias "default": Serve's own Python proxy).
TEST_REQUEST_PATHS = {"haproxy": "haproxy", "python": "python", "default": "python"}


def requested_path() -> str:
    """The request path the serving tests ask for (RAYLM_TEST_REQUEST_PATH, default haproxy as shipped); a module
    may pin its own (start_ray's `request_path`: tests/test_serving_python_proxy.py keeps the fallback tested)."""
    value = os.environ.get("RAYLM_TEST_REQUEST_PATH", "haproxy")
    if value not in TEST_REQUEST_PATHS:
        raise ValueError(f"RAYLM_TEST_REQUEST_PATH={value!r}: one of {', '.join(TEST_REQUEST_PATHS)}")
    return TEST_REQUEST_PATHS[value]


def serving_node_env(haproxy_stats_port: int, haproxy_metrics_port: int, fallback_proxy_port: int,
                     request_path: str | None = None) -> dict[str, str]:
    """The environment a test's Ray node starts with: serving.ingress.node_env() on the requested path (HAProxy
    unless RAYLM_TEST_REQUEST_PATH=python, or where no HAProxy binary runs: then Serve's Python proxy, logged),
    with the ports HAProxy and the fallback proxy bind moved to this Ray instance's own: one pytest process runs
    several modules, and other Ray instances run on the machine."""
    from serving.ingress import node_env

    return node_env(stats_port=haproxy_stats_port, metrics_port=haproxy_metrics_port,
                    fallback_http_port=fallback_proxy_port, requested=request_path or requested_path())


def uses_haproxy() -> bool:
    """Whether the serving tests run on the HAProxy path: requested (the default) and a binary runs here."""
    from serving.ingress import request_path

    return request_path(requested_path()) == "haproxy"


# On HAProxy's path (direct ingress), Ray Serve keeps an ingress replica that is being stopped open for
# RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S (30 s) so that an external load balancer can deregister it first:
# every serve.shutdown() at a module's end waited those 30 s with no request in flight (teardowns of 33-34 s).
# Modules whose replicas stop only at their end run with 1 s; tests/test_serving_scaling.py, which stops and
# deletes replicas under load, keeps Ray's 30 s.
QUICK_REPLICA_STOP_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


def start_ray(num_cpus: int, metrics_port: int, request_path: str | None = None, quick_replica_stop: bool = False):
    """A local Ray for one test module; env set so replicas inherit API keys and report metrics fast.
    The request path is HAProxy's as shipped (serving.ingress.node_env), or `request_path`, or
    RAYLM_TEST_REQUEST_PATH's. `quick_replica_stop`: QUICK_REPLICA_STOP_ENV, for a module that stops its
    replicas only at its end (else Ray's own drain period, also when an earlier module set the short one)."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYLM_API_KEYS"] = ",".join(API_KEYS)
    # Replicas push metrics to the export port every second instead of every 10 s.
    os.environ["RAY_metrics_report_interval_ms"] = "1000"
    # The serving node's environment (serving/ingress.py); on the HAProxy path with ports of this Ray instance, so
    # that two test modules (or another user's Ray) on one machine do not collide.
    os.environ.update(serving_node_env(metrics_port + HAPROXY_STATS_OFFSET, metrics_port + HAPROXY_METRICS_OFFSET,
                                       metrics_port + FALLBACK_PROXY_OFFSET, request_path))
    for key, value in QUICK_REPLICA_STOP_ENV.items():
        if quick_replica_stop:
            os.environ[key] = value
        else:
            os.environ.pop(key, None)
    import ray

    if ray.is_initialized():  # the session's shared Train/Tune Ray (tests/conftest.py): this module needs its own
        ray.shutdown()
    for attempt in range(3):
        try:
            return ray.init(num_cpus=num_cpus, include_dashboard=False, _metrics_export_port=metrics_port,
                            log_to_driver=False)
        except Exception as exc:
            # Ray 2.60 gives its raylet a fixed 30 s to register, and the driver a fixed deadline to reach the GCS;
            # on a shared machine under heavy load (load 30 seen) either can pass. Only those failures are retried.
            if not any(m in str(exc) for m in ("timed out during startup", "Failed to connect to GCS")) or attempt == 2:
                raise
            ray.shutdown()
            time.sleep(5)


def stop_ray() -> None:
    """Shut down only what this module started: its Serve instance, then its Ray."""
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def config_for_test(config_name: str, *, http_port: int, app_args: dict, deployment_overrides: dict | None = None,
                route_prefix: str | None = None) -> dict:
    """A shipped Serve config with args pointed at test exports and test-sized deployment options."""
    config = yaml.safe_load((CONFIGS / config_name).read_text())
    config["http_options"]["port"] = http_port
    config["http_options"]["host"] = "127.0.0.1"
    for app in config["applications"]:
        app["args"].update(app_args)
        if route_prefix is not None:
            app["route_prefix"] = route_prefix
        for deployment in app.get("deployments", []):
            for key, value in (deployment_overrides or {}).items():
                if isinstance(value, dict) and isinstance(deployment.get(key), dict):
                    deployment[key].update(value)
                else:
                    deployment[key] = value
    return config


def serve_run_config(config: dict, tmp_dir: Path, gcs_address: str, timeout_s: float = 300) -> None:
    """Deploy with the real `serve run --non-blocking <config.yaml>` CLI and wait until every app runs."""
    from ray import serve

    path = Path(tmp_dir) / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "ray.serve.scripts", "run", "--non-blocking", "--address", gcs_address, str(path)],
        capture_output=True, text=True, timeout=timeout_s, cwd=REPO,
    )
    assert result.returncode == 0, f"serve run failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    wait_apps_running([app["name"] for app in config["applications"]], timeout_s)


def wait_apps_running(names: list[str], timeout_s: float = 300) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        apps = serve.status().applications
        states = {n: apps[n].status if n in apps else None for n in names}
        failed = {n: apps[n].message for n in names if n in apps and apps[n].status == "DEPLOY_FAILED"}
        assert not failed, f"deploy failed: {failed}"
        if all(s == "RUNNING" for s in states.values()):
            return
        time.sleep(0.5)
    raise AssertionError(f"apps not RUNNING after {timeout_s}s: {states}")


def running_replicas(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def auth(key: str = API_KEYS[0]) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def scrape(metrics_port: int) -> str:
    import httpx

    return httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text


def metric_samples(text: str, name: str) -> list[tuple[str, float]]:
    """(label block, value) of every sample of one metric name in Prometheus text format."""
    samples = []
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, _, value = line.rpartition(" ")
            samples.append((labels, float(value)))
    return samples


def shared_exports(tmp_path_factory) -> dict[str, Path]:
    """The tiny exports every serving module uses, built once per pytest session (a few seconds).
    Modules that write into the adapters directory copy it first."""
    from serving.tiny_exports import build_demo_tree

    root = tmp_path_factory.getbasetemp() / "serving-exports"
    if not (root / ".complete").exists():
        build_demo_tree(root)
        (root / ".complete").touch()
    return {"causal_lm": root / "causal-lm", "classifier": root / "classifier", "ner": root / "ner",
            "adapters": root / "adapters"}


# ---- bad-body tables ---------------------------------------------------------------------------------
class Raw:
    """A request body sent byte for byte (not JSON-encoded by the test)."""

    def __init__(self, content: bytes, content_type: str = "application/json"):
        self.content, self.content_type = content, content_type


def raw_body_rows(model: str | None) -> list[tuple]:
    """Bodies that are not JSON objects, or not valid JSON/UTF-8, for any POST endpoint."""
    nested = b"[" * 3000 + b"]" * 3000
    model_field = f'"model": "{model}", ' if model else ""
    return [
        ("not json", Raw(b"{not json"), 422, "not valid JSON"),
        ("truncated json", Raw(b'{"model": "x", "pro'), 422, "not valid JSON"),
        ("trailing garbage", Raw(b'{"model": "x"} trailing'), 422, "not valid JSON"),
        ("empty body", Raw(b""), 422, "field required"),
        ("json array", Raw(b"[]"), 422, "valid dictionary"),
        ("json string", Raw(b'"hello"'), 422, "valid dictionary"),
        ("json null", Raw(b"null"), 422, "valid dictionary"),
        ("json number", Raw(b"123"), 422, "valid dictionary"),
        ("json NaN", Raw(b"NaN"), 422, "valid dictionary"),
        ("deeply nested", Raw(nested), 400, "error parsing the body"),
        ("invalid utf-8", Raw(b'{' + model_field.encode() + b'"prompt": "\xff\xfe\xfa", "input": "\xc3\x28"}'),
         400, "error parsing the body"),
        ("lone surrogate", Raw(('{' + model_field + '"prompt": "a\\ud800b", "input": "a\\ud800b", '
                               '"messages": [{"role": "user", "content": "a\\ud800b"}]}').encode()), 422, "surrogate"),
        ("plain text content type", Raw(b'{"input": "x"}', "text/plain"), 422, "valid dictionary"),
        ("5000-digit number", Raw(b'{"max_tokens": 1' + b"0" * 5000 + b"}"), 400, "error parsing the body"),
    ]


def check_error_table(url: str, rows: list[tuple], headers: dict[str, str]) -> list[str]:
    """POST every (label, body, status, message fragment) row; return every mismatch (wrong status, not
    OpenAI's error shape, message without the fragment, any 5xx), so one run reports all of them."""
    import json

    import httpx

    problems = []
    with httpx.Client(timeout=60) as client:
        for label, body, status, fragment in rows:
            if isinstance(body, Raw):
                response = client.post(url, content=body.content, headers={**headers, "content-type": body.content_type})
            else:
                response = client.post(url, content=json.dumps(body).encode(),
                                       headers={**headers, "content-type": "application/json"})
            try:
                error = response.json()["error"]
                shaped = set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
            except Exception:
                error, shaped = {"message": response.text[:200]}, False
            message = str(error.get("message"))
            if response.status_code != status or not shaped or fragment.lower() not in message.lower() \
                    or response.status_code >= 500 or len(message) > 2000:
                problems.append(f"{label}: want {status} ~{fragment!r}, got {response.status_code} "
                                f"{'' if shaped else '(not OpenAI error shape) '}{message[:300]!r}")
    return problems


def replica_handles(app: str, deployment: str) -> dict[str, object]:
    """Actor handle of each running replica of a deployment: Serve names its replica actors
    `SERVE_REPLICA::<app>#<deployment>#<id>` in the "serve" namespace."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and a["name"].startswith(prefix)]
    return {name: ray.get_actor(name, namespace="serve") for name in names}


def replica_pids(app: str, deployment: str) -> dict[str, int]:
    """Process id of each running replica of a deployment; each reports its own pid."""
    import ray

    return {name: ray.get(h.__ray_call__.remote(lambda _self: os.getpid()), timeout=30)
            for name, h in replica_handles(app, deployment).items()}


@contextlib.contextmanager
def causal_lm_app_beside_training(root: Path, base: Path, adapters: Path, http_port: int):
    """The causal-LM app on `base` with `adapters` (one replica, 1 CPU), deployed on the running Ray: the
    session's shared Ray of tests/conftest.py (`local_ray`: 4 logical CPUs, the dashboard on, the replica's API
    keys and the proxy's error shape in its environment), leaving room for a 2-worker training run beside it.
    Serve is shut down on exit, which frees the replica's CPU for the modules that share that Ray next."""
    import ray
    from ray import serve

    assert ray.is_initialized(), "request the local_ray fixture (tests/conftest.py) before this one"
    try:
        config = config_for_test(
            "causal_lm_cpu.yaml", http_port=http_port,
            app_args={"export_dir": str(base), "adapters_dir": str(adapters), "torch_threads": 1,
                      "max_batch_size": 4, "max_tokens_limit": 64},
            deployment_overrides={"autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
                                  "ray_actor_options": {"num_cpus": 1}},
        )
        serve_run_config(config, root, ray.get_runtime_context().gcs_address)
        yield
    finally:
        serve.shutdown()
