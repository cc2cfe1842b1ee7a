"""A local cluster's layout and records: the ports every node derives from the cluster's base port, the
state file (cluster.json) naming its nodes and their `ray start` sessions, and the /proc readers that find
and signal every process of a node's session. No Ray import: `cluster.local` and the demo's node launcher
share it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cluster.auth import Token

DEFAULT_BASE_PORT = 26200
# Every port a node opens is derived from the base port, so two clusters with different bases never collide
# (and none collides with a default `ray start` on 6379/8265). Layout, relative to the base:
#   +0 GCS, +1 Ray client server, +65 dashboard, then a block of PORTS_PER_NODE per node from +100.
PORTS_PER_NODE = 50
NODE_BLOCK_START = 100
MAX_PORT = 26999
STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"
@dataclass
class NodePorts:
    node_manager: int
    object_manager: int
    metrics_export: int
    dashboard_agent_listen: int
    dashboard_agent_grpc: int
    runtime_env_agent: int
    haproxy_stats: int  # Serve's HAProxy (serving/ingress.py NODE_ENV) binds these two on every interface
    haproxy_metrics: int
    fallback_proxy_http: int  # and the head its fallback Python proxy (HAProxy's backup server) on these
    fallback_proxy_grpc: int
    min_worker: int
    max_worker: int


@dataclass
class NodeRecord:
    name: str
    index: int
    num_cpus: float
    resources: dict[str, float]
    pid: int | None = None  # the `ray start --block` process: leader of the session holding the whole node
    log: str = ""


@dataclass
class ClusterState:
    dir: str
    base_port: int
    gcs_address: str
    dashboard_url: str
    token_path: str
    nodes: dict[str, NodeRecord] = field(default_factory=dict)

    def save(self) -> None:
        path = Path(self.dir) / STATE_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path) -> "ClusterState":
        path = Path(directory) / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no local cluster in {directory} ({STATE_FILE} missing); start one with `python -m cluster.local up`")
        raw = json.loads(path.read_text(encoding="utf-8"))
        raw["nodes"] = {name: NodeRecord(**node) for name, node in raw["nodes"].items()}
        return cls(**raw)

    @property
    def token(self) -> Token:
        return Token(Path(self.token_path).read_text(encoding="utf-8").strip(), self.token_path)

    def client_env(self) -> dict[str, str]:
        """Environment for a client (job submission, `ray` CLI) talking to this cluster."""
        return {
            "RAY_ADDRESS": self.dashboard_url,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": self.token_path,
        }


def default_dir(base_port: int) -> Path:
    # Short on purpose: Ray puts Unix sockets under the temp dir, and socket paths are limited to 107 bytes.
    return Path(f"/tmp/raylm-cluster-{base_port}")


def node_ports(base_port: int, index: int) -> NodePorts:
    start = base_port + NODE_BLOCK_START + PORTS_PER_NODE * index
    return NodePorts(
        node_manager=start,
        object_manager=start + 1,
        metrics_export=start + 2,
        dashboard_agent_listen=start + 3,
        dashboard_agent_grpc=start + 4,
        runtime_env_agent=start + 5,
        haproxy_stats=start + 6,
        haproxy_metrics=start + 7,
        fallback_proxy_http=start + 8,
        fallback_proxy_grpc=start + 9,
        min_worker=start + 10,
        max_worker=start + PORTS_PER_NODE - 1,
    )


def process_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def session_members(sid: int) -> list[int]:
    """Live PIDs in session `sid` (Linux /proc).

    A node's `ray start` runs in a session of its own, and every process of that node stays in it: GCS,
    raylet, dashboard, agents, and the workers, which the raylet puts in process groups of their own.
    """
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command name: state, ppid, pgrp, session, ...
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
