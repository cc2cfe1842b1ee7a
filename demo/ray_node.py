"""The demo's own Ray node: `ray start --block` in a session of its own (cluster.local), token auth on.

Every stage runs on it, and the Serve endpoint outlives the demo on it, so the user can try the endpoint
after `make demo` returns. Each run takes a free base port (a new node, a new endpoint); stopping one
(`python -m cluster.local --dir ... down`, or Ctrl-C during the demo) ends exactly its processes.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from cluster.local import LocalCluster
from cluster.local_state import TOKEN_FILE, default_dir, node_ports

BASE_PORTS = range(26200, 26851, 150)  # one node's ports: base .. base+149 (cluster.local's layout), all <= 26999


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_base_port() -> int:
    """A base port whose node directory is unused and whose main ports are free."""
    for base in BASE_PORTS:
        ports = node_ports(base, 0)
        if (default_dir(base) / "cluster.json").exists() and LocalCluster(base_port=base).running_node_count():
            continue
        if all(_port_free(p) for p in (base, base + 1, base + 65, ports.node_manager, ports.metrics_export)):
            return base
    raise RuntimeError("no free port range for the demo's Ray node in 26200-26999: stop earlier demo endpoints "
                       "(python -m cluster.local --dir /tmp/raylm-cluster-<port> down)")


def free_http_port(start: int = 8000) -> int:
    for port in range(start, start + 200):
        if _port_free(port):
            return port
    raise RuntimeError(f"no free HTTP port in {start}-{start + 199}")


def start_node(num_cpus: int, driver_log: Path) -> LocalCluster:
    """Start the node (its processes inherit this environment, plus Serve's request path: cluster.local gives each
    node serving.ingress.node_env(), HAProxy where its binary runs) and connect this driver to it.

    Ray reads RAY_AUTH_MODE once, when it is first imported: this runs before anything in this process
    imports ray (the demo runs as its own process: `python -m demo.main`). Ray's lines while this driver
    connects go to `driver_log` (training.console.keep_driver_logs).
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # The node's processes import raylm from this checkout, like the driver.
    repo = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [repo, os.environ.get("PYTHONPATH", "")] if p)
    base = free_base_port()
    node = LocalCluster(base_port=base, head_cpus=num_cpus)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(node.dir / TOKEN_FILE))
    node.up(workers=0, timeout_s=180)
    state = node.state
    os.environ["RAY_ADDRESS"] = state.gcs_address
    import ray

    from training.console import keep_driver_logs, quiet_progress_bars
    from training.driver import FORWARDED_ENV

    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env_vars.update(TOKENIZERS_PARALLELISM="false", **quiet_progress_bars())
    try:
        # Workers' output reaches this driver, which keeps it in the demo's driver.log and shows raylm's lines,
        # warnings and errors (training.console.keep_driver_logs).
        with keep_driver_logs(driver_log):
            ray.init(address=state.gcs_address, runtime_env={"env_vars": env_vars})
    except BaseException:
        node.down()  # never leave a node behind that nobody is connected to
        raise
    return node


def stop_command(node: LocalCluster) -> str:
    return f"{Path(sys.executable).as_posix()} -m cluster.local --dir {node.dir} down"


def stop_node(node: LocalCluster) -> None:
    """Disconnect this driver, then end every process of the node (and nothing else)."""
    import ray

    ray.shutdown()
    node.down()
