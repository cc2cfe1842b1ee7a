"""Check a run config against a Ray cluster before any GPU is requested.

    python -m cluster.preflight --config configs/pretrain/tiny_cpu.yaml --address http://127.0.0.1:26265
    python -m cluster.preflight --config configs/pretrain/gpt_gpu.yaml --cluster-config cluster/aws.yaml

What it checks, all at once, each problem printed with its fix:
  config       the config validates (typed schema) and has no incompatible combination of settings
               (rules in cluster/preflight_rules.yaml, e.g. quantized LoRA with ZeRO-3)
  capacity     scaling.num_workers x the resources per worker fit what the cluster has now (--address)
               or can autoscale to (--cluster-config: a `ray up` YAML or a KubeRay RayCluster manifest)
  gpus         GPUs are requested but no node offers any (e.g. a head without GPUs and no GPU workers)
  storage      run.storage_path is shared by all nodes when the run spans more than one machine
  working_dir  the job upload stays under the job server's 100 MiB cap

Exit codes: 0 no problem; 1 problems found; 2 bad arguments or unreadable files; 3 cluster unreachable.
Torch-free: it runs on a laptop next to `cluster.submit`.
"""

from __future__ import annotations

from cluster.requirements_check import check_requirements

check_requirements("cluster.preflight", run_as_main=__name__ == "__main__")  # before any third-party import

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.auth import find_token
from cluster.cluster_view import ClusterView, NodeShape, cluster_from_file, cluster_from_live, format_resources
from cluster.workdir import measure_working_dir

RULES_FILE = Path(__file__).with_name("preflight_rules.yaml")
REMOTE_STORAGE_SCHEMES = ("s3://", "gs://", "gcs://", "abfs://", "abfss://", "az://", "hdfs://", "oss://")
NETWORK_FS_TYPES = {"nfs", "nfs4", "cifs", "smb3", "lustre", "ceph", "glusterfs", "beegfs", "gpfs", "efs", "9p"}
EXIT_OK, EXIT_PROBLEMS, EXIT_INVALID, EXIT_UNREACHABLE = 0, 1, 2, 3


@dataclass
class Finding:
    """One check's verdict. `problem` None means the check passed; `detail` says what was seen."""

    check: str
    detail: str
    problem: str | None = None
    fix: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


# -------------------------------------------------------------------------------------------------
# Incompatible combinations: data-driven rules over the raw YAML


class Condition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    any_of: list[str] = Field(min_length=1)
    enabled: bool | None = None
    equals: Any = None
    in_: list[Any] | None = Field(None, alias="in")
    default: Any = None

    @model_validator(mode="after")
    def _one_test(self) -> "Condition":
        tests = [self.enabled is not None, "equals" in self.model_fields_set, self.in_ is not None]
        if sum(tests) != 1:
            raise ValueError(f"condition on {self.any_of}: give exactly one of enabled / equals / in")
        return self

    def holds(self, raw: dict) -> bool:
        value = next((v for v in (_dotted(raw, p) for p in self.any_of) if v is not _MISSING), _MISSING)
        if value is _MISSING:
            if self.default is None:
                return False
            value = self.default
        if self.enabled is not None:
            return _is_enabled(value) == self.enabled
        if "equals" in self.model_fields_set:
            return value == self.equals
        return value in (self.in_ or [])


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    when: list[Condition] = Field(min_length=1)
    problem: str
    fix: str


class RuleBook(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rules: list[Rule]


_MISSING = object()


def _dotted(raw: dict, path: str) -> Any:
    node: Any = raw
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _is_enabled(value: Any) -> bool:
    if isinstance(value, dict):
        return bool(value) and value.get("enabled", True) is not False
    return bool(value) and value not in ("none", "off", "false")


def load_rules(path: str | Path = RULES_FILE) -> list[Rule]:
    return RuleBook.model_validate(yaml.safe_load(Path(path).read_text(encoding="utf-8"))).rules


def check_combinations(raw: dict, rules: list[Rule] | None = None) -> list[Finding]:
    """Every rule whose conditions all hold on the raw config, as a problem with its fix."""
    rules = load_rules() if rules is None else rules
    fired = [Finding("config", f"rule {r.id}", r.problem, r.fix) for r in rules if all(c.holds(raw) for c in r.when)]
    return fired or [Finding("config", f"no incompatible combination ({len(rules)} rules checked)")]


# -------------------------------------------------------------------------------------------------
# Checks against the cluster


def worker_resources(raw: dict) -> tuple[int, dict[str, float], str]:
    """(workers a run starts with, resources per worker, placement strategy) from a raw config, typed defaults.

    Raises ConfigError naming each bad `scaling.*` key (checked on its own: configs of kinds that
    training.config does not know still carry a scaling section).
    """
    from pydantic import ValidationError

    from training.config import ConfigError, ScalingSection, format_validation_error

    class ScalingOnly(BaseModel):
        scaling: ScalingSection = Field(default_factory=ScalingSection)

    try:
        scaling = ScalingOnly.model_validate({"scaling": raw.get("scaling") or {}}).scaling
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, ScalingOnly), "scaling") from None
    return scaling.min_workers, scaling.worker_resources, scaling.placement_strategy  # elastic runs start at min


def check_scaling(raw: dict) -> list[Finding]:
    """The scaling section's problems, each with its fix (empty when it validates)."""
    from training.config import ConfigError

    try:
        worker_resources(raw)
    except ConfigError as err:
        return [Finding("scaling", "scaling section", p, "edit the YAML or pass --set scaling.KEY=VALUE") for p in err.problems]
    return []


def _fits_on(node: dict[str, float], need: dict[str, float]) -> int:
    counts = [math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0]
    return min(counts) if counts else 10**6


def room_for(view: ClusterView, need: dict[str, float], strategy: str, at_max: bool) -> int:
    """How many workers of shape `need` the cluster holds (now, or at its autoscaling max)."""
    per_node = [(_fits_on(s.resources, need), s.max if at_max else s.now) for s in view.shapes]
    if strategy == "STRICT_SPREAD":
        return sum(min(fit, 1) * count for fit, count in per_node)
    if strategy == "STRICT_PACK":
        return max((fit for fit, count in per_node if count > 0), default=0)
    return sum(fit * count for fit, count in per_node)


def check_capacity(raw: dict, view: ClusterView) -> list[Finding]:
    workers, need, strategy = worker_resources(raw)
    asked = f"{workers} worker(s) x {format_resources(need)} ({strategy})"
    findings: list[Finding] = []
    gpu_nodes = [s for s in view.shapes if s.resources.get("GPU", 0) > 0 and s.max > 0]
    if need.get("GPU", 0) > 0 and not gpu_nodes:
        head_only = all(s.is_head or s.max == 0 for s in view.shapes)
        if head_only:
            problem = f"GPUs requested ({asked}) but the cluster is a head without GPUs and has no worker nodes that could bring any"
            fix = "add a GPU worker node type (see cluster/aws.yaml `gpu_worker` or the k8s RayCluster `gpu-workers` group), or set scaling.use_gpu: false for a CPU run"
        else:
            problem = f"GPUs requested ({asked}) but no node in {view.source} has GPUs, now or after autoscaling"
            fix = "give a worker node type GPUs (resources: {GPU: N} / nvidia.com/gpu limits), or set scaling.use_gpu: false"
        findings.append(Finding("gpus", asked, problem, fix))
        return findings  # capacity for GPU workers is moot without GPU nodes
    else:
        findings.append(Finding("gpus", "no GPUs requested" if not need.get("GPU") else f"GPU nodes available: {', '.join(s.name for s in gpu_nodes)}"))

    missing = [k for k, v in need.items() if v > 0 and k != "GPU" and not any(s.resources.get(k, 0) > 0 for s in view.shapes)]
    if missing:
        findings.append(Finding("capacity", asked, f"no node offers resource(s) {', '.join(missing)}", "remove them from scaling.resources_per_worker or add them to a node type's resources"))
        return findings
    now, most = room_for(view, need, strategy, at_max=False), room_for(view, need, strategy, at_max=True)
    if workers <= now:
        findings.append(Finding("capacity", f"{asked} fit now (room for {now})"))
    elif workers <= most:
        findings.append(Finding("capacity", f"{asked}: room for {now} now, {most} once the autoscaler adds nodes; the job waits for them"))
    else:
        per_node = max((_fits_on(s.resources, need) for s in view.shapes if s.max > 0), default=0)
        fix = (
            f"lower scaling.num_workers to {most}" if most > 0 else "lower scaling.resources_per_worker so that one worker fits on a node"
        ) + (
            f", or raise the max workers of the node types (one node holds {per_node})" if per_node else ", or add a node type large enough for one worker"
        )
        if strategy == "STRICT_SPREAD" and most < workers:
            fix += ", or use scaling.placement_strategy: SPREAD/PACK"
        findings.append(
            Finding("capacity", asked, f"{asked} do not fit {view.source}: room for {now} now and at most {most} after autoscaling ({view.describe()})", fix)
        )
    return findings


def _mount_fs_type(path: Path) -> str | None:
    """Filesystem type of the mount holding `path` on this machine (Linux /proc/mounts), or None."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    path = path.resolve()
    best = max((m for m in mounts if path == Path(m[0]) or Path(m[0]) in path.parents), key=lambda m: len(m[0]), default=None)
    return best[1] if best else None


def check_storage(raw: dict, view: ClusterView, shared_paths: list[str]) -> Finding:
    """A multi-machine run needs run.storage_path on storage that every node sees (checkpoints, restore)."""
    storage = str(_dotted(raw, "run.storage_path") if _dotted(raw, "run.storage_path") is not _MISSING else "./runs")
    workers, need, strategy = worker_resources(raw)
    # STRICT_PACK puts every worker on one node when one node can hold them all.
    hosts = 1 if strategy == "STRICT_PACK" and room_for(view, need, strategy, at_max=True) >= workers else view.hosts_max
    if workers <= 1 or hosts <= 1:
        return Finding("storage", f"run.storage_path {storage!r}: one machine ({workers} worker(s), {hosts} host(s)), local disk is shared")
    if storage.startswith(REMOTE_STORAGE_SCHEMES):
        return Finding(
            "storage", f"run.storage_path {storage!r} is an object-storage URI",
            f"run.storage_path {storage!r}: raylm reads and writes run data through the filesystem, not object-store URIs",
            "mount the bucket on every node at the same path (s3fs, gcsfuse) and set run.storage_path to that path",
        )
    path = Path(storage).expanduser()
    shared = list(shared_paths) + view.shared_paths
    if path.is_absolute() and any(path == Path(p) or Path(p) in path.parents for p in shared):
        return Finding("storage", f"run.storage_path {storage!r} is under a shared mount ({', '.join(shared)}); every node must mount it")
    fs = _mount_fs_type(path) if path.is_absolute() else None
    if fs and (fs in NETWORK_FS_TYPES or fs.startswith("fuse.")):
        return Finding("storage", f"run.storage_path {storage!r} is on a {fs} mount here; make sure every node mounts it at the same path")
    where = "relative to each node's working dir" if not path.is_absolute() else f"on a local {fs or 'unknown'} filesystem"
    return Finding(
        "storage",
        f"{workers} workers over up to {hosts} machines",
        f"run.storage_path {storage!r} is {where}: with workers on several machines each node writes its own "
        "checkpoint shards and a restarted worker cannot find the others' checkpoints",
        "set run.storage_path to a path every node mounts at the same place: NFS/EFS/Filestore, or a bucket "
        "mounted with s3fs/gcsfuse (declare it with --shared-path PATH)",
    )


# -------------------------------------------------------------------------------------------------
# Typed config validation (training.config picks the class by the config's kind)


def check_typed_config(raw: dict, path: str) -> list[Finding]:
    """Validate with the typed class of the config's `kind` (pretrain when absent, finetune, ...)."""
    from training.config import ConfigError, PretrainConfig, config_class_for, validate_config

    unknown = set(raw) - set(PretrainConfig.model_fields)
    if "kind" not in raw and unknown:
        return [Finding("config", f"no `kind` key and sections {sorted(unknown)} are not pretrain sections: typed "
                        "validation skipped, rules applied (add `kind: finetune` for a fine-tuning config)")]
    try:
        model_cls = config_class_for(raw, path)
        validate_config(raw, model_cls, path)
    except ConfigError as err:
        return [Finding("config", "typed validation", p, "edit the YAML or pass --set KEY=VALUE") for p in err.problems]
    return [Finding("config", f"validates as a {raw.get('kind', 'pretrain')} config ({model_cls.__name__})")]


def check_sweep_config(raw: dict, path: str) -> tuple[list[Finding], dict]:
    """A sweep (kind: tune) validates with tune.config; returns the findings and the base run to check further."""
    from training.config import ConfigError
    from tune.config import validate_sweep

    try:
        sweep = validate_sweep(raw, path, Path(path).parent)
    except ConfigError as err:
        base = raw.get("base") if isinstance(raw.get("base"), dict) else {}
        return [Finding("config", "sweep validation", p, "edit the sweep YAML") for p in err.problems], base
    return [Finding("config", f"validates as a sweep of {sweep.kind} runs; each trial holds "
                              f"{sweep.trial_resources()}")], sweep.base_raw


# -------------------------------------------------------------------------------------------------
# CLI: parse -> validate -> build -> run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.preflight",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="run YAML (pretrain, or any raylm run config)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override like the entry point's --set")
    parser.add_argument("--address", help="dashboard URL of a running cluster (default: $RAY_ADDRESS when it is an http URL)")
    parser.add_argument("--cluster-config", help="`ray up` YAML or KubeRay RayCluster/RayJob manifest: the autoscaling envelope")
    parser.add_argument("--working-dir", default=".", help="what cluster.submit would upload (default: current dir)")
    parser.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="left out of the upload, as for cluster.submit")
    parser.add_argument("--shared-path", action="append", default=[], metavar="PATH", help="a path every node mounts (NFS, EFS, Filestore)")
    parser.add_argument("--token-file", help="file holding the cluster's auth token (else RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)")
    return parser.parse_args(argv)


def run_preflight(
    raw: dict,
    config_path: str,
    live: ClusterView | None,
    envelope: ClusterView | None,
    working_dir: Path | None,
    excludes: list[str] | None = None,
    shared_paths: list[str] | None = None,
) -> list[Finding]:
    """All checks on one config; the cluster checks run against the envelope (else the live view) when given."""
    if raw.get("kind") == "tune":  # a sweep: the checks below apply to one trial, i.e. its base run
        findings, raw = check_sweep_config(raw, config_path)
    else:
        findings = check_typed_config(raw, config_path)
    findings += check_combinations(raw)
    view = _merge(live, envelope)
    scaling_problems = check_scaling(raw)
    if scaling_problems:
        # A typed pretrain config already reported them; other kinds of config did not.
        reported = {f.problem for f in findings}
        findings += [f for f in scaling_problems if f.problem not in reported]
        if view is not None:
            findings.append(Finding("capacity", "scaling section invalid: capacity, GPU and storage checks skipped until it validates"))
    elif view is None:
        findings.append(Finding("capacity", "no cluster given (--address / --cluster-config): capacity, GPU and storage checks skipped"))
    else:
        findings += check_capacity(raw, view)
        findings.append(check_storage(raw, view, shared_paths or []))
    if working_dir is not None:
        report = measure_working_dir(working_dir, excludes)
        size = f"{report.upload_bytes / 2**20:.1f} MiB in {report.file_count} files"
        found = report.problem_and_fix()
        findings.append(Finding("working_dir", size, *found) if found else Finding("working_dir", f"upload {size} (cap 100 MiB)"))
    return findings


def _merge(live: ClusterView | None, envelope: ClusterView | None) -> ClusterView | None:
    """Live nodes tell what exists now; a cluster config tells what the autoscaler may add."""
    if live and envelope:
        merged = ClusterView(f"{live.source} + {envelope.source}", list(live.shapes), list(envelope.shared_paths))
        for shape in envelope.shapes:
            if not shape.is_head:
                merged.shapes.append(NodeShape(shape.name, shape.resources, 0, shape.max, False))
        return merged
    return live or envelope


def format_report(findings: list[Finding], config_path: str) -> str:
    problems = [f for f in findings if not f.ok]
    lines = [f"preflight {config_path}:"]
    for f in findings:
        if f.ok:
            lines.append(f"  ok      {f.check:11} {f.detail}")
        else:
            lines.append(f"  PROBLEM {f.check:11} {f.problem}")
            if f.fix:
                lines.append(f"          {'':11} fix: {f.fix}")
    lines.append(f"{len(problems)} problem(s)" + (" - fix them before requesting GPUs" if problems else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from training.config import ConfigError, apply_overrides, read_yaml

    try:
        raw = apply_overrides(read_yaml(args.config), args.overrides)
    except ConfigError as err:
        print(f"preflight: {err}", file=sys.stderr)
        return EXIT_INVALID
    address = args.address or (os.environ.get("RAY_ADDRESS") if str(os.environ.get("RAY_ADDRESS", "")).startswith("http") else None)
    envelope = None
    if args.cluster_config:
        try:
            envelope = cluster_from_file(args.cluster_config)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            print(f"preflight: --cluster-config: {exc}", file=sys.stderr)
            return EXIT_INVALID
    working_dir = Path(args.working_dir)
    if not working_dir.is_dir():
        print(f"preflight: --working-dir {args.working_dir!r} is not a directory", file=sys.stderr)
        return EXIT_INVALID
    live = None
    if address:
        try:
            live = cluster_from_live(address, args.token_file)
        except Exception as exc:  # noqa: BLE001 - connection/auth errors from Ray's client
            from cluster.submit import explain_connection_error

            print(f"preflight: {explain_connection_error(address, find_token(args.token_file), exc)}", file=sys.stderr)
            return EXIT_UNREACHABLE
    findings = run_preflight(raw, args.config, live, envelope, working_dir, args.exclude, args.shared_path)
    print(format_report(findings, args.config))
    return EXIT_PROBLEMS if any(not f.ok for f in findings) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
