"""Shared helpers of the serving tests: a Ray instance per module, tiny exports, `serve run` of a config.

Every helper drives the real system: a local Ray, the `serve run` CLI on a real config file,
HTTP on 127.0.0.1. Ports: Serve HTTP 18000-18099, metrics export 18100-18199, HAProxy stats 18300-18399
and HAProxy metrics 18400-18499 (metrics port + 200 / + 300; for `causal_lm_app_beside_training`, HTTP port
+ 300 / + 400).
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


HAPROXY_STATS_OFFSET, HAPROXY_METRICS_OFFSET = 200, 300  # from a module's metrics port


def serving_node_env(haproxy_stats_port: int, haproxy_metrics_port: int) -> dict[str, str | None]:
    """The environment a test's Ray node starts with: serving.ingress.NODE_ENV (Serve's Python proxy and the error
    hook), or with RAYLM_TEST_REQUEST_PATH=haproxy HAPROXY_NODE_ENV with HAProxy's stats and metrics ports moved
    to the given ones. Keys of the other path are unset (None): one pytest process runs
    several modules and os.environ outlives each."""
    from serving.ingress import PYTHON_PROXY_NODE_ENV, haproxy_node_env

    if uses_haproxy():
        return dict(haproxy_node_env(stats_port=haproxy_stats_port, metrics_port=haproxy_metrics_port))
    return {**{key: None for key in haproxy_node_env(0, 0)}, **PYTHON_PROXY_NODE_ENV}


def uses_haproxy() -> bool:
    """Whether the serving tests run on the HAProxy path (opt-in: RAYLM_TEST_REQUEST_PATH=haproxy)."""
    return os.environ.get("RAYLM_TEST_REQUEST_PATH") == "haproxy"


def start_ray(num_cpus: int, metrics_port: int):
    """A local Ray for one test module; env set so replicas inherit API keys and report metrics fast.
    The request path is serving.ingress.NODE_ENV's (Serve's Python proxy), or HAProxy's with
    RAYLM_TEST_REQUEST_PATH=haproxy."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYLM_API_KEYS"] = ",".join(API_KEYS)
    # Replicas push metrics to the export port every second instead of every 10 s.
    os.environ["RAY_metrics_report_interval_ms"] = "1000"
    # The serving node's environment (serving/ingress.py); on the HAProxy path its stats and metrics ports of this
    # Ray instance, so that two test modules (or another user's Ray) on one machine do not collide.
    for key, value in serving_node_env(metrics_port + HAPROXY_STATS_OFFSET, metrics_port + HAPROXY_METRICS_OFFSET).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    import ray

    if ray.is_initialized():  # the session's shared Train/Tune Ray (tests/conftest.py): this module needs its own
        ray.shutdown()
    for attempt in range(3):
        try:
            return ray.init(num_cpus=num_cpus, include_dashboard=False, _metrics_export_port=metrics_port,
                            log_to_driver=False)
        except Exception as exc:
            # Ray 2.60 gives its raylet a fixed 30 s to register; on a shared machine under heavy load
            # that can pass. Only that failure is retried.
            if "timed out during startup" not in str(exc) or attempt == 2:
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


def replica_pids(app: str, deployment: str) -> dict[str, int]:
    """Process id of each running replica of a deployment: Serve names its replica actors
    `SERVE_REPLICA::<app>#<deployment>#<id>` in the "serve" namespace; each reports its own pid."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and a["name"].startswith(prefix)]
    handles = {name: ray.get_actor(name, namespace="serve") for name in names}
    return {name: ray.get(h.__ray_call__.remote(lambda _self: os.getpid()), timeout=30) for name, h in handles.items()}


def haproxy_replayed_requests(stats_port: int, app: str) -> int:
    """Requests to `app` that HAProxy sent again after a failed attempt (retries + redispatches of its backend,
    which Ray names http-<app>), read from HAProxy's stats page (RAY_SERVE_HAPROXY_STATS_PORT, CSV). A reload
    (Serve's replica set changed) starts them at 0."""
    import csv
    import io

    import httpx

    text = httpx.get(f"http://127.0.0.1:{stats_port}/stats;csv", timeout=10).text
    rows = csv.DictReader(io.StringIO(text.removeprefix("# ")))
    return sum(int(row["wretr"] or 0) + int(row["wredis"] or 0) for row in rows
               if row["svname"] == "BACKEND" and row["pxname"] == f"http-{app}")


def kill_a_replica_under_load(base: str, app: str, model: str, after_kill=lambda: None) -> tuple[list, list, object]:
    """SIGKILL one of the two replicas of `app` (route prefix /<app>) while 16 OpenAI-client requests (default
    retries) and 8 clients of plain HTTP requests (no retries) are in flight. Returns the OpenAI completions, the
    plain responses, and what `after_kill()` returned (called right after the kill), once Serve has replaced the
    dead replica (asserted)."""
    import concurrent.futures as futures
    import signal
    import threading

    import httpx
    import openai

    pids = replica_pids(app, "CausalLMServer")
    assert len(pids) == 2
    client = openai.OpenAI(base_url=f"{base}/{app}/v1", api_key=API_KEYS[0], timeout=120)
    assert client.max_retries == 2  # the client's default

    def with_client(i):
        return client.completions.create(model=model, prompt=f"Story number {i}:", max_tokens=240, temperature=0)

    killed = threading.Event()

    def plain_until_killed(i):
        """Plain requests back to back until one that was in flight at the kill has answered: a greedy
        tiny model may stop at EOS early, so one request per client could end before the kill."""
        body = {"model": model, "prompt": f"Tale {i}:", "max_tokens": 240, "temperature": 0}
        answers, deadline = [], time.monotonic() + 300
        while time.monotonic() < deadline:
            answers.append(httpx.post(f"{base}/{app}/v1/completions", json=body, headers=auth(), timeout=120))
            if killed.is_set():
                break
        return answers

    # Two canary streams, sent after the others: requests spread over both replicas, so once both canaries
    # have a token, the batches (with the plain requests sent before) are decoding. Waiting for one canary
    # only let a loaded machine kill a replica before any plain request reached it.
    canaries_decoding = threading.Semaphore(0)

    def canary():
        """A stream sent with the others: its first token means its replica's batch is decoding."""
        body = {"model": model, "prompt": "Canary:", "max_tokens": 240, "temperature": 0, "stream": True}
        signalled = False
        try:
            with httpx.stream("POST", f"{base}/{app}/v1/completions", json=body, headers=auth(), timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and not signalled:
                        signalled = True
                        canaries_decoding.release()
        except httpx.HTTPError:
            pass  # it may have been on the killed replica: its stream just ends
        finally:
            if not signalled:
                canaries_decoding.release()

    with futures.ThreadPoolExecutor(26) as pool:
        openai_calls = [pool.submit(with_client, i) for i in range(16)]
        plain_calls = [pool.submit(plain_until_killed, i) for i in range(8)]
        canaries = [pool.submit(canary) for _ in range(2)]
        assert canaries_decoding.acquire(timeout=180) and canaries_decoding.acquire(timeout=180)
        os.kill(next(iter(pids.values())), signal.SIGKILL)
        killed.set()
        observed = after_kill()
        [f.result() for f in canaries]
        completions = [f.result() for f in openai_calls]
        responses = [r for f in plain_calls for r in f.result()]
    # Serve replaces the dead replica.
    deadline = time.monotonic() + 60
    while running_replicas(app, "CausalLMServer") < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert running_replicas(app, "CausalLMServer") == 2
    return completions, responses, observed


def assert_replica_lost_answer(response) -> None:
    """What a client gets for a request whose replica died before answering (serving/errors.py): a retryable
    503 in OpenAI's shape with Retry-After."""
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "replica_unavailable"


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
