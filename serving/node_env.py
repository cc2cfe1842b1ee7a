"""Print the environment a Ray node that serves raylm starts with, as `export` lines for the shell that then runs
`ray start` or `serve run` (Serve reads it when its processes start: serving/ingress.py).

    eval "$(python -m serving.node_env)" && serve run serving/configs/causal_lm_cpu.yaml
    eval "$(python -m serving.node_env)" && ray start --head ...     # on every node, then `serve deploy`

HAProxy's request path where a binary runs on this machine, else Serve's Python proxy (said once, on stderr);
RAYLM_SERVE_REQUEST_PATH=python or `--request-path python` chooses the latter. A second Ray instance on the same
host gives HAProxy and the fallback proxy ports of their own (--stats-port, --metrics-port, --fallback-port).
"""

from __future__ import annotations

from cluster.requirements_check import check_requirements

check_requirements("serving.node_env", run_as_main=__name__ == "__main__")  # before any third-party import

import argparse
import shlex
import sys

from serving.ingress import REQUEST_PATHS, node_env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serving.node_env", description=__doc__.split("\n\n")[0])
    parser.add_argument("--request-path", choices=REQUEST_PATHS, default=None,
                        help="default: RAYLM_SERVE_REQUEST_PATH, else haproxy where its binary runs")
    parser.add_argument("--stats-port", type=int, help="HAProxy's stats page (default 8404, all interfaces)")
    parser.add_argument("--metrics-port", type=int, help="HAProxy's Prometheus exporter (default 9101, all interfaces)")
    parser.add_argument("--fallback-port", type=int, help="the head's fallback Python proxy behind HAProxy (default 8500)")
    return parser.parse_args(argv)


def export_lines(env: dict[str, str]) -> str:
    """`export KEY=VALUE` lines a POSIX shell reads back exactly (values quoted; HAProxy's retry policy has a newline)."""
    return "".join(f"export {key}={shlex.quote(value)}\n" for key, value in env.items())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # node_env chooses the path (and logs why, once, when it falls back): asking request_path() first as well
    # ran `haproxy -v` twice.
    env = node_env(stats_port=args.stats_port, metrics_port=args.metrics_port, fallback_http_port=args.fallback_port,
                   requested=args.request_path)
    chosen = "haproxy" if env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "python"
    print(f"raylm: serving nodes started from this shell use the {chosen} request path", file=sys.stderr)
    sys.stdout.write(export_lines(env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
