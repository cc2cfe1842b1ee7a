"""The `ray up` configs under cluster/ validate against Ray's cluster config schema and keep raylm's rules."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_CONFIGS = sorted(p for p in (REPO / "cluster").glob("*.yaml") if "available_node_types" in p.read_text(encoding="utf-8"))


def ray_cluster_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text(encoding="utf-8"))


def test_both_clouds_have_a_launcher_config():
    assert {p.name for p in LAUNCHER_CONFIGS} == {"aws.yaml", "gcp.yaml"}


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_validates_against_ray_cluster_schema(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    jsonschema.validate(config, ray_cluster_schema())
    # What `ray up` does with it: fill in the provider's defaults, then Ray's own validation.
    prepared = prepare_config(config)
    validate_config(prepared)
    assert prepared["provider"]["type"] == path.stem


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_cpu_head_and_autoscaled_gpu_workers(path):
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0, "CPU head that runs no training"
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types, "a GPU worker node type"
    for name, node_type in gpu_types.items():
        assert 0 <= node_type["min_workers"] < node_type["max_workers"] <= config["max_workers"], name
        assert node_type.get("idle_timeout_s") or config.get("idle_timeout_minutes"), name
    assert config["idle_timeout_minutes"] > 0


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_token_auth_metrics_and_private_dashboard(path):
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    head_start = " ".join(config["head_start_ray_commands"])
    worker_start = " ".join(config["worker_start_ray_commands"])
    for commands in (head_start, worker_start):
        assert "RAY_AUTH_MODE=token" in commands
        assert "RAY_AUTH_TOKEN_PATH=$HOME/.ray/auth_token" in commands
        assert "--metrics-export-port=8080" in commands
    assert "--dashboard-host=127.0.0.1" in head_start, "dashboard reachable only through `ray dashboard` (SSH)"
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token", "the token file is mounted on every node"
    assert publicly_opened_ray_ports(config) == [], "the dashboard, GCS, client and metrics ports stay closed to the outside"


# Ports that must never be reachable from outside the cluster: GCS, dashboard/job API, Ray client, metrics.
RAY_PRIVATE_PORTS = {6379: "GCS", 8265: "dashboard", 10001: "Ray client", 8080: "metrics"}


def publicly_opened_ray_ports(config: dict) -> list[str]:
    """Inbound rules of the launcher config that open a private Ray port to IP ranges.

    Where a `ray up` config can open ports: AWS `provider.security_group.IpPermissions` (boto3's
    shape, appended by Ray to its default rules: all ports between the cluster's own groups, SSH from
    anywhere). Rules that name only security groups (UserIdGroupPairs) stay inside the cluster. GCP
    configs have no firewall setting in Ray's schema (firewall rules live outside the config)."""
    found = []
    rules = ((config.get("provider") or {}).get("security_group") or {}).get("IpPermissions") or []
    for rule in rules:
        ranges = [r.get("CidrIp") for r in rule.get("IpRanges", [])] + [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        ranges += [p.get("PrefixListId") for p in rule.get("PrefixListIds", [])]
        if not ranges:
            continue
        all_ports = str(rule.get("IpProtocol", "-1")) in ("-1", "all")
        low, high = rule.get("FromPort", 0), rule.get("ToPort", 65535)
        for port, name in RAY_PRIVATE_PORTS.items():
            if all_ports or (str(rule.get("IpProtocol")).lower() in ("tcp", "6") and low <= port <= high):
                found.append(f"{name} port {port} open to {', '.join(map(str, ranges))}")
    return found


def _with_rules(*rules: dict) -> dict:
    config = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text(encoding="utf-8"))
    config["provider"]["security_group"] = {"GroupName": "raylm", "IpPermissions": list(rules)}
    jsonschema.validate(config, ray_cluster_schema())  # a config `ray up` would accept
    return config


def test_open_port_check_catches_a_crafted_security_group():
    """The check above can fail: rules that open the dashboard, GCS or metrics ports are caught, SSH and
    group-to-group rules are not."""
    anywhere = [{"CidrIp": "0.0.0.0/0"}]
    dashboard = {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": anywhere}
    assert publicly_opened_ray_ports(_with_rules(dashboard)) == ["dashboard port 8265 open to 0.0.0.0/0"]
    wide = {"IpProtocol": "tcp", "FromPort": 6000, "ToPort": 9000, "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}
    assert publicly_opened_ray_ports(_with_rules(wide)) == [
        "GCS port 6379 open to ::/0", "dashboard port 8265 open to ::/0", "metrics port 8080 open to ::/0"]
    everything = {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "203.0.113.0/24"}]}
    assert len(publicly_opened_ray_ports(_with_rules(everything))) == len(RAY_PRIVATE_PORTS)
    ssh = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": anywhere}
    intra = {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": "sg-0123456789abcdef0"}]}
    assert publicly_opened_ray_ports(_with_rules(ssh, intra)) == []


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_setup_installs_raylm_like_the_readme(path):
    """`make install` is the README's install; the venv it builds is the one Ray is started from."""
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    setup = " && ".join(config["setup_commands"])
    assert re.search(r"cd ~/raylm && make install\b", setup), setup
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^install:", makefile, re.M) and "TORCH_SPEC" in makefile
    assert config["file_mounts"]["~/raylm"] == "."
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "~/raylm/.venv/bin/ray " in command
    assert set(config["metadata"]["raylm"]["shared_paths"]) == {"/mnt/shared"}


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_preflight_accepts_the_gpu_configs_on_it(path):
    """The shipped GPU run configs fit the shipped clusters, on their shared mount."""
    from cluster.cluster_view import cluster_from_file
    from cluster.preflight import check_capacity, check_storage

    view = cluster_from_file(path)
    for config in sorted((REPO / "configs" / "pretrain").glob("*gpu*.yaml")):
        raw = yaml.safe_load(config.read_text(encoding="utf-8"))
        findings = check_capacity(raw, view) + [check_storage(raw, view, [])]
        assert [f for f in findings if not f.ok] == [], (config.name, findings)


def test_no_secret_or_token_value_in_cluster_configs():
    for path in LAUNCHER_CONFIGS:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"RAY_AUTH_TOKEN=\S", text), f"{path}: pass the token as a file, never inline"
