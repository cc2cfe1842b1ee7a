"""A real multi-node Ray cluster on one machine: a head and N worker nodes, each its own `ray start`.

    python -m cluster.local up --workers 1          # head + 1 worker node on 127.0.0.1, token auth on
    python -m cluster.local status
    python -m cluster.local stop-node worker-1      # simulate losing a node (SIGKILL, like a dead VM)
    python -m cluster.local start-node worker-1     # bring it back
    python -m cluster.local down

Every node runs `ray start --block` in its own session with its own temp dir and its own ports, so
`down` ends exactly the processes of this cluster by signalling the members of those sessions: it never runs
`ray stop`, which would kill every Ray process on the machine. The state lives in `--dir`
(default /tmp/raylm-cluster-<base port>): cluster.json, the auth token, and each node's logs.
"""

from __future__ import annotations

from cluster.requirements_check import check_requirements

check_requirements("cluster.local", run_as_main=__name__ == "__main__")  # before any third-party import

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from cluster.auth import auth_headers
from cluster.local_state import (
    DEFAULT_BASE_PORT,
    MAX_PORT,
    STATE_FILE,
    TOKEN_FILE,
    ClusterState,
    NodeRecord,
    default_dir,
    node_ports,
    process_alive,
    session_members,
    signal_all,
)
from serving.ingress import node_env

# Ray 2.60's `ray start` gives its raylet a fixed 30 s to register with the GCS (`raylet_start_wait_time_s = 30`
# in ray/_private/node.py; no flag or environment variable changes it). On a loaded machine that can pass:
# `ray start` then exits with this message although nothing is wrong, and the node is simply started again.
RAY_START_TIMED_OUT = "timed out during startup"
DEFAULT_START_ATTEMPTS = 3


class LocalCluster:
    """A head plus worker nodes, each a separate `ray start --block` in its own session, on 127.0.0.1."""

    def __init__(
        self,
        directory: str | Path | None = None,
        base_port: int = DEFAULT_BASE_PORT,
        head_cpus: float = 4,
        worker_cpus: float = 4,
        extra_env: dict[str, str] | None = None,
        start_attempts: int = DEFAULT_START_ATTEMPTS,
    ):
        """`start_attempts`: how often a node is started when its `ray start` exits on Ray's fixed 30 s
        registration wait (RAY_START_TIMED_OUT); any other exit fails at once."""
        self.base_port = base_port
        self.dir = Path(directory or default_dir(base_port)).resolve()
        self.head_cpus = head_cpus
        self.worker_cpus = worker_cpus
        self.extra_env = dict(extra_env or {})
        self.start_attempts = max(1, start_attempts)
        self.state: ClusterState | None = None
        self._attempts: dict[str, int] = {}  # node name -> `ray start` attempts since start_node was called
        self._log_offsets: dict[str, int] = {}  # node name -> where the current attempt's output begins

    # ---------------------------------------------------------------------------------------------
    # Lifecycle

    def up(self, workers: int = 1, timeout_s: float = 120) -> ClusterState:
        """Start the head and `workers` worker nodes; return once all of them are ALIVE."""
        problems = self._check_up(workers)
        if problems:
            raise ValueError("cannot start the local cluster:\n" + "\n".join(f"  - {p}" for p in problems))
        self.dir.mkdir(parents=True, exist_ok=True)
        token_path = self._write_token()
        self.state = ClusterState(
            dir=str(self.dir),
            base_port=self.base_port,
            gcs_address=f"127.0.0.1:{self.base_port}",
            dashboard_url=f"http://127.0.0.1:{self.base_port + 65}",
            token_path=str(token_path),
        )
        self.state.nodes["head"] = NodeRecord("head", 0, self.head_cpus, {"raylm_head_node": 1.0})
        for i in range(1, workers + 1):
            self.state.nodes[f"worker-{i}"] = NodeRecord(f"worker-{i}", i, self.worker_cpus, {"raylm_worker_node": 1.0})
        self.state.save()
        try:
            self.start_node("head", wait=False)
            self.wait_for_nodes(1, timeout_s)
            for name in list(self.state.nodes)[1:]:
                self.start_node(name, wait=False)
            self.wait_for_nodes(1 + workers, timeout_s)
        except BaseException:
            self.down()
            raise
        return self.state

    def down(self, grace_s: float = 5) -> None:
        """Stop every node of this cluster (workers first, then the head), and nothing else."""
        state = self.state or (ClusterState.load(self.dir) if (self.dir / STATE_FILE).exists() else None)
        if state is None:
            return
        self.state = state
        for name in sorted(state.nodes, key=lambda n: n == "head"):
            self.stop_node(name, grace_s=grace_s)

    def start_node(self, name: str, wait: bool = True, timeout_s: float = 120) -> NodeRecord:
        """Start (or restart) one node of the cluster as its own process group.

        With wait=True, return once it is ALIVE; a `ray start` that gave up on Ray's fixed 30 s
        registration wait is started again (up to `start_attempts` times in all) while waiting.
        """
        state = self._require_state()
        node = state.nodes[name]
        if process_alive(node.pid):
            raise RuntimeError(f"node {name} is already running (pid {node.pid}); stop it first")
        self._attempts[name] = 1
        self._launch(node)
        if wait:
            self.wait_for_nodes(self.running_node_count(), timeout_s)
        return node

    def _launch(self, node: NodeRecord) -> None:
        """Run the node's `ray start --block` in a new session, its output appended to <dir>/<name>.log."""
        state = self._require_state()
        log_path = self.dir / f"{node.name}.log"
        self._log_offsets[node.name] = log_path.stat().st_size if log_path.exists() else 0
        log = open(log_path, "ab")
        # A new session makes `ray start` the leader of a session that holds every Ray process of this node
        # (GCS, raylet, dashboard, workers in their own process groups): signalling it stops this node only.
        process = subprocess.Popen(
            self._start_command(node),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self._node_env(node),
            start_new_session=True,
        )
        log.close()
        node.pid = process.pid
        node.log = str(log_path)
        state.save()

    def _restart_after_slow_start(self, node: NodeRecord) -> bool:
        """Start `node` again if its `ray start` exited on Ray's fixed registration wait and attempts are left.

        What the failed attempt left of its session (a GCS, a raylet still starting) is killed first, so the
        new attempt gets the same ports.
        """
        attempt = self._attempts.get(node.name, 1)
        if attempt >= self.start_attempts or not node.log or not Path(node.log).exists():
            return False
        with open(node.log, "rb") as fh:
            fh.seek(self._log_offsets.get(node.name, 0))
            output = fh.read().decode("utf-8", errors="replace")
        if RAY_START_TIMED_OUT not in output:
            return False
        leftovers = session_members(node.pid) if node.pid else []
        signal_all(leftovers, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while node.pid and session_members(node.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        print(f"[cluster.local] node {node.name}: its raylet did not register within Ray's fixed 30 s (loaded "
              f"machine?); starting it again (attempt {attempt + 1} of {self.start_attempts})", file=sys.stderr)
        self._attempts[node.name] = attempt + 1
        self._launch(node)
        return True

    def stop_node(self, name: str, grace_s: float = 5, kill: bool = False) -> None:
        """Stop one node: SIGTERM to its `ray start`, SIGKILL to what is left of its session after `grace_s`.

        kill=True sends SIGKILL to every process of the node at once, like a machine that disappears.
        """
        state = self._require_state()
        node = state.nodes[name]
        if not node.pid:
            return
        session = node.pid
        if kill:
            signal_all(session_members(session), signal.SIGKILL)
        else:
            # Every process of the node gets SIGTERM at once (raylet, GCS and workers shut down cleanly on it);
            # whatever is left after the grace period gets SIGKILL (the GCS and `ray start` itself linger on SIGTERM).
            signal_all(session_members(session), signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while session_members(session) and time.monotonic() < deadline:
                time.sleep(0.2)
            signal_all(session_members(session), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while session_members(session) and time.monotonic() < deadline:
            time.sleep(0.1)
        try:  # reap the `ray start` process if we are its parent
            os.waitpid(session, os.WNOHANG)
        except ChildProcessError:
            pass
        node.pid = None
        state.save()

    # ---------------------------------------------------------------------------------------------
    # Queries

    def nodes(self) -> list[dict]:
        """The cluster's nodes as Ray's state API reports them (id, ip, state, resources_total, ...)."""
        from ray.util.state import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        state = self._require_state()
        client = StateApiClient(address=state.dashboard_url, headers=auth_headers(state.token))
        listed = client.list(StateResource.NODES, options=ListApiOptions(detail=True), raise_on_missing_output=False)
        return [n if isinstance(n, dict) else asdict(n) for n in listed]

    def running_node_count(self) -> int:
        """Nodes of this cluster whose `ray start` process is running (what Ray should report ALIVE)."""
        return sum(1 for n in self._require_state().nodes.values() if process_alive(n.pid))

    def alive_node_count(self) -> int:
        try:
            return sum(1 for n in self.nodes() if n["state"] == "ALIVE")
        except Exception:  # dashboard not up yet
            return 0

    def wait_for_nodes(self, count: int, timeout_s: float = 120) -> None:
        """Block until exactly `count` nodes are ALIVE; fail with the node logs' tails otherwise.

        A node whose `ray start` exited on Ray's fixed 30 s registration wait is started again (see
        `start_attempts`), and the wait starts over for it.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.alive_node_count() == count:
                return
            dead = [n for n in self._require_state().nodes.values() if n.pid and not process_alive(n.pid)]
            for node in dead:
                if not self._restart_after_slow_start(node):
                    raise RuntimeError(self._failure_report(f"node {node.name} exited while starting", node))
                deadline = time.monotonic() + timeout_s
            time.sleep(1)
        raise TimeoutError(self._failure_report(f"{count} alive node(s) not reached within {timeout_s:.0f} s", None))

    # ---------------------------------------------------------------------------------------------
    # Internals

    def _require_state(self) -> ClusterState:
        if self.state is None:
            self.state = ClusterState.load(self.dir)
        return self.state

    def _check_up(self, workers: int) -> list[str]:
        problems = []
        if workers < 0:
            problems.append(f"--workers: {workers} must be >= 0")
        last = node_ports(self.base_port, workers).max_worker
        if self.base_port < 1024 or last > MAX_PORT:
            problems.append(
                f"--base-port {self.base_port} with {workers} worker node(s) needs ports up to {last}; "
                f"keep them <= {MAX_PORT}: lower --base-port or --workers"
            )
        if (self.dir / STATE_FILE).exists():
            existing = ClusterState.load(self.dir)
            running = [n.name for n in existing.nodes.values() if process_alive(n.pid)]
            if running:
                problems.append(
                    f"a cluster is already running in {self.dir} (nodes: {', '.join(running)}); "
                    f"stop it with `python -m cluster.local down --dir {self.dir}` or use another --dir/--base-port"
                )
        if len(str(self.dir)) > 60:
            problems.append(f"--dir {self.dir} is too long for Ray's Unix socket paths; use a shorter path (<= 60 chars)")
        return problems

    def _write_token(self) -> Path:
        from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

        path = self.dir / TOKEN_FILE
        if not path.exists():
            path.write_text(generate_new_authentication_token(), encoding="utf-8")
        path.chmod(0o600)
        return path

    def _node_env(self, node: NodeRecord) -> dict[str, str]:
        state = self._require_state()
        ports = node_ports(state.base_port, node.index)
        env = dict(os.environ)
        # The token file is the one source of truth for this cluster: a stray RAY_AUTH_TOKEN from the
        # caller's shell would otherwise win over it.
        env.pop("RAY_AUTH_TOKEN", None)
        # Jobs run `python ...`: make that the interpreter this cluster runs on, as an activated venv would.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=state.token_path,
            RAY_USAGE_STATS_ENABLED="0",
            # Processes on these nodes that call ray.init() without an address (Ray Train's helpers do) must
            # join this cluster, not whichever other Ray instance runs on the machine.
            RAY_ADDRESS=state.gcs_address,
            # A node killed on one machine is noticed in ~3 s instead of ~30 s (GCS health checks).
            RAY_health_check_period_ms="1000",
            RAY_health_check_timeout_ms="1000",
            RAY_health_check_failure_threshold="3",
        )
        # A node that serves raylm: Serve's request path (HAProxy where its binary runs, else Serve's Python proxy,
        # said once; serving/ingress.py), with what HAProxy and the head's fallback proxy bind on this node's own
        # ports: their defaults (8404, 9101, 8500, 9500) would collide between nodes, and with any other Ray here.
        env.update(node_env(stats_port=ports.haproxy_stats, metrics_port=ports.haproxy_metrics,
                            fallback_http_port=ports.fallback_proxy_http, fallback_grpc_port=ports.fallback_proxy_grpc))
        env.update(self.extra_env)
        return env

    def _start_command(self, node: NodeRecord) -> list[str]:
        state = self._require_state()
        ports = node_ports(state.base_port, node.index)
        ray_cli = str(Path(sys.executable).with_name("ray"))
        command = [
            ray_cli, "start", "--block",
            "--node-ip-address", "127.0.0.1",
            f"--num-cpus={node.num_cpus:g}",
            "--num-gpus=0",
            f"--resources={json.dumps(node.resources)}",
            f"--temp-dir={self.dir / ('n' + str(node.index))}",
            f"--node-manager-port={ports.node_manager}",
            f"--object-manager-port={ports.object_manager}",
            f"--metrics-export-port={ports.metrics_export}",
            f"--dashboard-agent-listen-port={ports.dashboard_agent_listen}",
            f"--dashboard-agent-grpc-port={ports.dashboard_agent_grpc}",
            f"--runtime-env-agent-port={ports.runtime_env_agent}",
            f"--min-worker-port={ports.min_worker}",
            f"--max-worker-port={ports.max_worker}",
            "--disable-usage-stats",
        ]
        if node.name == "head":
            command += [
                "--head",
                f"--port={state.base_port}",
                f"--ray-client-server-port={state.base_port + 1}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={state.base_port + 65}",
            ]
        else:
            command += [f"--address={state.gcs_address}"]
        return command

    def _failure_report(self, what: str, node: NodeRecord | None) -> str:
        lines = [what]
        for n in [node] if node else self._require_state().nodes.values():
            if n and n.log and Path(n.log).exists():
                tail = Path(n.log).read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
                lines.append(f"--- last lines of {n.log}:")
                lines.extend(tail)
        return "\n".join(lines)


# -------------------------------------------------------------------------------------------------
# CLI


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cluster.local", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT, help="first of this cluster's ports (default %(default)s)")
    parser.add_argument("--dir", default=None, help="state, token and logs (default /tmp/raylm-cluster-<base port>)")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a head and worker nodes on 127.0.0.1")
    up.add_argument("--workers", type=int, default=1, help="worker nodes besides the head (default %(default)s)")
    up.add_argument("--head-cpus", type=float, default=4, help="logical CPUs of the head (default %(default)s)")
    up.add_argument("--worker-cpus", type=float, default=4, help="logical CPUs of each worker node (default %(default)s)")
    sub.add_parser("down", help="stop every node of this cluster (and nothing else)")
    sub.add_parser("status", help="print the nodes, the dashboard address and the client environment")
    for name, text in (("start-node", "start (again) one node, e.g. worker-1"), ("stop-node", "kill one node, e.g. worker-1")):
        p = sub.add_parser(name, help=text)
        p.add_argument("node")
    return parser.parse_args(argv)


def _print_status(cluster: LocalCluster) -> None:
    state = cluster._require_state()
    print(f"dashboard: {state.dashboard_url}   GCS: {state.gcs_address}   token: {state.token_path}")
    try:
        listed = cluster.nodes()
    except Exception as exc:  # noqa: BLE001 - status must still print the local view
        listed = []
        print(f"(cluster not reachable: {exc.__class__.__name__}: {exc})")
    for n in listed:
        role = "head  " if n.get("is_head_node") else "worker"
        print(f"  {role} {n['node_id'][:12]} {n['state']:5} {n.get('resources_total')}")
    print("Client environment (for python -m cluster.submit / ray job ...):")
    for key, value in state.client_env().items():
        print(f"  export {key}={value}")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    cluster = LocalCluster(
        args.dir,
        base_port=args.base_port,
        head_cpus=getattr(args, "head_cpus", 4),
        worker_cpus=getattr(args, "worker_cpus", 4),
    )
    try:
        if args.command == "up":
            cluster.up(workers=args.workers)
            _print_status(cluster)
        elif args.command == "down":
            cluster.down()
            print(f"stopped the local cluster in {cluster.dir}")
        elif args.command == "status":
            _print_status(cluster)
        elif args.command == "start-node":
            cluster.start_node(args.node)
            print(f"started {args.node}")
        elif args.command == "stop-node":
            cluster.stop_node(args.node, kill=True)
            print(f"killed {args.node}")
    except (ValueError, RuntimeError, TimeoutError, FileNotFoundError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
