"""Serve's Python proxy, the request path raylm falls back to where no HAProxy binary runs (serving/ingress.py
`node_env`), or chosen with RAYLM_SERVE_REQUEST_PATH=python: this module pins it, so that every run of the suite
tests it beside the default HAProxy path. What differs there is raylm's proxy hook (serving/errors.py): a replica
killed under load -> 503 with Retry-After in OpenAI's shape (no request of an OpenAI client fails), a path outside
every application -> 404 in OpenAI's shape. Real Serve, two replicas of a tiny causal-LM export."""

import httpx
import psutil
import pytest
from ray import serve
from serving_fixtures import auth, shared_exports, start_ray, stop_ray, wait_apps_running
from test_serving_scaling import MODEL, kill_a_replica_under_load, kill_problems

from serving.app import CausalLMServer
from serving.args import ServingArgs

HTTP_PORT = 18061
METRICS_PORT = 18161
BASE = f"http://127.0.0.1:{HTTP_PORT}"


@pytest.fixture(scope="module")
def killable(tmp_path_factory):
    """The `killable` app of tests/test_serving_scaling.py (two replicas, one batch each) on Serve's Python proxy."""
    exports = shared_exports(tmp_path_factory)
    start_ray(num_cpus=4, metrics_port=METRICS_PORT, request_path="python")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": HTTP_PORT})
        args = ServingArgs(export_dir=str(exports["causal_lm"]), torch_threads=1, max_batch_size=32,
                           batch_wait_timeout_s=1.0, max_tokens_limit=240).model_dump()
        two = CausalLMServer.options(num_replicas=2, max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.5},
                                     health_check_period_s=1)
        serve.run(two.bind(args), name="killable", route_prefix="/killable", blocking=False)
        wait_apps_running(["killable"])
        yield BASE
    finally:
        stop_ray()


def test_serves_through_the_python_proxy(killable):
    """The Serve HTTP port is Serve's Python proxy (a Ray worker process), not HAProxy, and it answers."""
    (front,) = [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == HTTP_PORT]
    assert psutil.Process(front.pid).name() != "haproxy"
    assert "haproxy" not in {p.name() for p in psutil.Process(front.pid).children(recursive=True)}
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
    answer = httpx.post(f"{BASE}/killable/v1/completions", json=body, headers=auth(), timeout=60)
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1


def test_a_replica_killed_under_load_gets_a_retryable_503(killable, tmp_path):
    """tests/test_serving_scaling.py's kill test, on this proxy: every OpenAI-client request completes, each plain
    request the dead replica held gets a 503 with Retry-After in OpenAI's shape, every other one a 200."""
    completions, responses, canaries, record = kill_a_replica_under_load(BASE, "killable", MODEL, tmp_path / "killed.json")
    problems = kill_problems(completions, responses, canaries, record, on_haproxy=False)
    assert not problems, "\n".join(problems + [f"killed: {record}"])


def test_a_path_outside_every_app_gets_an_openai_shaped_404(killable):
    outside = httpx.post(f"{BASE}/no-such-app/v1/completions", json={}, headers=auth(), timeout=30)
    assert outside.status_code == 404
    assert set(outside.json()["error"]) == {"message", "type", "param", "code"}
    assert outside.json()["error"]["type"] == "not_found_error"
