"""The environment a Ray node that serves raylm starts with (`ray start`, the RayService containers,
the demo's node, the serving tests): Serve reads these when its controller, proxies and replicas start,
so they cannot go in an application's runtime_env.

NODE_ENV is what ships today: Serve's Python proxy with raylm's error hook (PYTHON_PROXY_NODE_ENV).
HAPROXY_NODE_ENV is the faster request path, measured (13.6 ms -> 2.27 ms of Serve overhead per request,
docs/serving.md, Request path) but not yet the default (docs/serving.md says what is left to check).

HAProxy on the Serve HTTP port of each node forwards each request to an ingress replica's own HTTP
server (direct ingress: a port in 30000-31000 bound on `http_options.host`), instead of Serve's Python
proxy handing it to the replica over Ray. What it changes (docs/serving.md, Request path):
- The proxy callback still applies on each replica's own HTTP server and on the Python proxy that stays
  on the head as HAProxy's fallback.
- A replica that dies mid-request: with `retry-on conn-failure empty-response` and `option
  http-buffer-request` HAProxy sends the request again to another replica (not a stream whose first bytes
  had reached HAProxy, nor a body over HAProxy's 16 KB buffer), which answers it.
- A path that matches no application's route prefix gets HAProxy's own plain-text 404.
- HAProxy binds its stats page (8404) and Prometheus exporter (9101) on all interfaces; two Ray
  instances on one host need their own pair: `haproxy_node_env(stats_port=..., metrics_port=...)`.
"""

from __future__ import annotations

PROXY_CALLBACK = "serving.errors:proxy_middlewares"

# Serve's Python proxy with raylm's error hook (OpenAI-shaped errors, a dead replica -> 503 + Retry-After).
PYTHON_PROXY_NODE_ENV: dict[str, str] = {
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_CALLBACK,
}

# HAProxy's retry policy on the HAProxy path: two config lines in one value (see HAPROXY_NODE_ENV).
HAPROXY_RETRY_ON = "conn-failure empty-response\n    option http-buffer-request"

# The faster request path (module docstring); opt-in until the serving tests pass with it.
HAPROXY_NODE_ENV: dict[str, str] = {
    **PYTHON_PROXY_NODE_ENV,
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # Ray's bundle for the request path: user code on the replica's event loop (raylm's routes never
    # block it: tokenizing and the model run on their own threads), GC frozen after start-up, access
    # logs buffered (1000 lines, flushed at once on an error), replica logs to files only, not stderr.
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # Replay a request whose replica closed the connection without answering (it died) on another one, and
    # (second line) let HAProxy read a request's whole body before it picks a replica: HAProxy 2.8 keeps a copy
    # for a replay only of a request it had entirely when it started sending it (L7 retries are turned off for
    # the request otherwise), and clients such as httpx and the openai client send the headers and the body in
    # two writes, so without it a request on a dying replica got HAProxy's 502 (as a plain-text 500) at random
    # (docs/serving.md, Request path). Ray 2.60's template has no setting for `option http-buffer-request`; it
    # renders this value as-is after `retry-on` in its `defaults` section (tests/test_serving_contract.py
    # renders it and runs `haproxy -c` on the result).
    "RAY_SERVE_HAPROXY_RETRY_ON": HAPROXY_RETRY_ON,
}


# What a serving node needs in its environment; k8s/ RayService containers carry at least these
# (tests/test_k8s_manifests.py), and the serving tests run with them.
NODE_ENV: dict[str, str] = dict(PYTHON_PROXY_NODE_ENV)


def haproxy_node_env(stats_port: int | None = None, metrics_port: int | None = None) -> dict[str, str]:
    """HAPROXY_NODE_ENV, with HAProxy's stats and metrics ports moved (several Ray instances on one host)."""
    env = dict(HAPROXY_NODE_ENV)
    if stats_port is not None:
        env["RAY_SERVE_HAPROXY_STATS_PORT"] = str(stats_port)
    if metrics_port is not None:
        env["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(metrics_port)
    return env
