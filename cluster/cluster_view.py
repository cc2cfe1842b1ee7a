"""The cluster as preflight sees it: node shapes read from a live cluster (its dashboard's state API), a
`ray up` cluster config, or a KubeRay RayCluster/RayJob/RayService manifest. Torch-free, like preflight."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cluster.auth import auth_headers, find_token


@dataclass
class NodeShape:
    """A kind of node: its Ray resources, how many exist now and how many the autoscaler may run."""

    name: str
    resources: dict[str, float]
    now: int
    max: int
    is_head: bool = False
    host: str | None = None  # node IP for live nodes; None for a node type (each node its own machine)


@dataclass
class ClusterView:
    source: str
    shapes: list[NodeShape] = field(default_factory=list)
    shared_paths: list[str] = field(default_factory=list)  # paths every node mounts (declared by the cluster config)

    @property
    def hosts_max(self) -> int:
        """How many distinct machines the cluster can span."""
        live_hosts = {s.host for s in self.shapes if s.host is not None}
        typed = sum(s.max for s in self.shapes if s.host is None)
        return len(live_hosts) + typed

    def describe(self) -> str:
        parts = []
        for s in self.shapes:
            count = f"{s.now}" if s.now == s.max else f"{s.now}..{s.max}"
            parts.append(f"{s.name} x{count} {format_resources(s.resources)}")
        return f"{self.source}: " + "; ".join(parts)


def format_resources(res: dict[str, float]) -> str:
    """CPU, GPU and custom resources of a node or a worker, for messages (memory and node: keys left out)."""
    shown = {k: v for k, v in res.items() if k in ("CPU", "GPU") or not (k.startswith("node:") or k in ("memory", "object_store_memory"))}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"


def cluster_from_live(address: str, token_file: str | None = None) -> ClusterView:
    """The alive nodes of a running cluster, from its dashboard's state API."""
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    client = StateApiClient(address=address, headers=auth_headers(find_token(token_file)))
    nodes = client.list(StateResource.NODES, options=ListApiOptions(detail=True), raise_on_missing_output=False)
    view = ClusterView(source=f"cluster at {address}")
    for n in nodes:
        n = n if isinstance(n, dict) else n.__dict__
        if n["state"] != "ALIVE":
            continue
        res = {k: float(v) for k, v in (n.get("resources_total") or {}).items()}
        head = bool(n.get("is_head_node"))
        view.shapes.append(NodeShape(("head " if head else "node ") + n["node_id"][:8], res, 1, 1, head, n.get("node_ip")))
    return view


def cluster_from_launcher_yaml(raw: dict, source: str) -> ClusterView:
    """Node types of a `ray up` cluster config: the head plus each worker type up to its max_workers."""
    declared = ((raw.get("metadata") or {}).get("raylm") or {}).get("shared_paths") or []
    view = ClusterView(source=source, shared_paths=[str(p) for p in declared])
    types = raw.get("available_node_types") or {}
    head_type = raw.get("head_node_type")
    global_max = raw.get("max_workers")
    for name, spec in types.items():
        res = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        if name == head_type:
            view.shapes.append(NodeShape(f"{name} (head)", res, 1, 1, True))
            continue
        most = int(spec.get("max_workers", global_max if global_max is not None else 0))
        if global_max is not None:
            most = min(most, int(global_max))
        view.shapes.append(NodeShape(name, res, int(spec.get("min_workers", 0)), most, False))
    return view


_QUANTITY = re.compile(r"^([0-9.]+)(m|k|Ki|M|Mi|G|Gi|T|Ti)?$")


def _k8s_quantity(value: Any) -> float:
    match = _QUANTITY.match(str(value))
    if not match:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    number, suffix = float(match[1]), match[2]
    return number / 1000 if suffix == "m" else number * {None: 1, "k": 1e3, "Ki": 2**10, "M": 1e6, "Mi": 2**20, "G": 1e9, "Gi": 2**30, "T": 1e12, "Ti": 2**40}[suffix]


def _group_resources(group: dict) -> dict[str, float]:
    """Ray resources of a KubeRay group: rayStartParams win, else the Ray container's limits (as KubeRay does)."""
    params = group.get("rayStartParams") or {}
    container = ((group.get("template") or {}).get("spec") or {}).get("containers", [{}])[0]
    limits = {**((container.get("resources") or {}).get("requests") or {}), **((container.get("resources") or {}).get("limits") or {})}
    res: dict[str, float] = {}
    if "num-cpus" in params:
        res["CPU"] = float(params["num-cpus"])
    elif "cpu" in limits:
        res["CPU"] = float(math.floor(_k8s_quantity(limits["cpu"])) or _k8s_quantity(limits["cpu"]))
    if "num-gpus" in params:
        res["GPU"] = float(params["num-gpus"])
    elif "nvidia.com/gpu" in limits:
        res["GPU"] = _k8s_quantity(limits["nvidia.com/gpu"])
    if "resources" in params:
        res.update({k: float(v) for k, v in yaml.safe_load(str(params["resources"]).strip("'\"")).items()})
    return res


def _shared_mounts(group: dict) -> list[str]:
    """Mount paths of the Ray container backed by network volumes (PVC, NFS, CSI): what every pod can share."""
    pod = (group.get("template") or {}).get("spec") or {}
    network = {v["name"] for v in pod.get("volumes") or [] if {"persistentVolumeClaim", "nfs", "csi"} & set(v)}
    container = (pod.get("containers") or [{}])[0]
    return [m["mountPath"] for m in container.get("volumeMounts") or [] if m.get("name") in network]


def cluster_from_raycluster(raw: dict, source: str) -> ClusterView:
    """Groups of a KubeRay RayCluster (or the rayClusterSpec of a RayJob/RayService)."""
    spec = raw.get("spec") or {}
    spec = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    view = ClusterView(source=source, shared_paths=_shared_mounts(spec.get("headGroupSpec") or {}))
    view.shapes.append(NodeShape("head", _group_resources(spec.get("headGroupSpec") or {}), 1, 1, True))
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    for group in spec.get("workerGroupSpecs") or []:
        replicas = int(group.get("replicas", 0)) * int(group.get("numOfHosts", 1))
        most = int(group.get("maxReplicas", replicas)) * int(group.get("numOfHosts", 1)) if autoscaling else replicas
        view.shapes.append(NodeShape(group.get("groupName", "workers"), _group_resources(group), replicas, most, False))
    return view


def cluster_from_file(path: str | Path) -> ClusterView:
    """A ClusterView from a `ray up` YAML or a KubeRay manifest (first RayCluster/RayJob/RayService in it)."""
    text = Path(path).read_text(encoding="utf-8")
    for doc in yaml.safe_load_all(text):
        if not isinstance(doc, dict):
            continue
        if doc.get("kind") in ("RayCluster", "RayJob", "RayService"):
            return cluster_from_raycluster(doc, f"{doc['kind']} {path}")
        if "available_node_types" in doc:
            return cluster_from_launcher_yaml(doc, f"cluster config {path}")
    raise ValueError(f"{path}: neither a `ray up` cluster config (available_node_types) nor a KubeRay RayCluster/RayJob/RayService")
