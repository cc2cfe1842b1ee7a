"""`python -m cluster.preflight` finds each problem it promises in crafted configs, and names the fix.

The clusters here are the shipped `ray up` configs (real files) and crafted ones written to tmp_path; the
check against a live cluster runs in test_cluster_multinode.py, which owns the one local cluster.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.cluster_view import cluster_from_file
from cluster.preflight import (
    Condition,
    check_capacity,
    check_combinations,
    check_storage,
    load_rules,
    run_preflight,
)
from cluster.workdir import measure_working_dir, upload_cap_bytes

REPO = Path(__file__).resolve().parents[1]
AWS = REPO / "cluster" / "aws.yaml"


def raw_config(name: str, **sections) -> dict:
    raw = yaml.safe_load((REPO / "configs" / "pretrain" / f"{name}.yaml").read_text(encoding="utf-8"))
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def problems(findings) -> list:
    return [f for f in findings if not f.ok]


@pytest.fixture(scope="module")
def big_working_dir(tmp_path_factory) -> Path:
    """A project dir whose upload would exceed the job server's cap because of one checkpoint file."""
    root = tmp_path_factory.mktemp("bigproject")
    (root / "training").mkdir()
    (root / "training" / "train.py").write_text("print('hi')\n")
    (root / "checkpoints").mkdir()
    with open(root / "checkpoints" / "model.bin", "wb") as f:
        f.write(os.urandom(upload_cap_bytes() + 2**20))  # random bytes: zip cannot shrink them under the cap
    return root


@pytest.fixture
def quantized_lora_zero3(tmp_path) -> Path:
    """A finetune-style config: LoRA adapters on a 4-bit base model, with ZeRO-3."""
    path = tmp_path / "qlora.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"source": "hf_dir", "path": "/models/base"},
                "peft": {"method": "lora", "r": 16, "alpha": 32},
                "quantization": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
                "deepspeed": {"zero_stage": 3},
                "scaling": {"num_workers": 4, "use_gpu": True},
                "run": {"storage_path": "/mnt/shared/raylm-runs"},
            }
        )
    )
    return path


def test_quantized_lora_with_zero3_is_flagged(quantized_lora_zero3):
    raw = yaml.safe_load(quantized_lora_zero3.read_text())
    (finding,) = problems(check_combinations(raw))
    assert finding.detail == "rule quantized-lora-with-zero3"
    assert "zero_stage: 2" in finding.fix
    # The same config with ZeRO-2, or with LoRA switched off, is fine.
    assert problems(check_combinations({**raw, "deepspeed": {"zero_stage": 2}})) == []
    assert problems(check_combinations({**raw, "peft": {"enabled": False}})) == []


def test_every_rule_fires_on_a_config_built_from_its_conditions():
    """The rule table is data: each rule, fed a config that meets its conditions, fires, and only then."""
    for rule in load_rules():
        raw: dict = {}
        for condition in rule.when:
            value = {"r": 8} if condition.enabled else condition.equals if "equals" in condition.model_fields_set else condition.in_[0]
            node = raw
            *parents, leaf = condition.any_of[0].split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        fired = [f.detail for f in problems(check_combinations(raw))]
        assert f"rule {rule.id}" in fired, (rule.id, raw)
        assert "rule " + rule.id not in [f.detail for f in problems(check_combinations({}))]


def test_rule_conditions_must_name_one_test():
    with pytest.raises(ValueError, match="exactly one"):
        Condition.model_validate({"any_of": ["deepspeed.zero_stage"], "equals": 3, "in": [3]})


def test_too_many_workers_for_what_the_cluster_can_autoscale_to():
    view = cluster_from_file(AWS)
    raw = raw_config("llama_125m_gpu", scaling={"num_workers": 40})
    (finding,) = problems(check_capacity(raw, view))
    assert finding.check == "capacity"
    assert "room for 0 now and at most 16 after autoscaling" in finding.problem
    assert "lower scaling.num_workers to 16" in finding.fix
    # Workers too big for any node type: the fix says so instead of suggesting a count.
    raw = raw_config("llama_125m_gpu", scaling={"resources_per_worker": {"CPU": 8, "GPU": 8}})
    (finding,) = problems(check_capacity(raw, view))
    assert "so that one worker fits on a node" in finding.fix
    # What fits once the autoscaler adds GPU nodes is not a problem.
    assert problems(check_capacity(raw_config("llama_125m_gpu"), view)) == []


def test_gpus_requested_on_a_head_without_gpus(tmp_path):
    head_only = yaml.safe_load(AWS.read_text())
    head_only["available_node_types"] = {"head": head_only["available_node_types"]["head"] | {"resources": {"CPU": 8}}}
    path = tmp_path / "head_only.yaml"
    path.write_text(yaml.safe_dump(head_only))
    (finding,) = problems(check_capacity(raw_config("llama_125m_gpu"), cluster_from_file(path)))
    assert finding.check == "gpus"
    assert "head without GPUs" in finding.problem
    assert "add a GPU worker node type" in finding.fix and "use_gpu: false" in finding.fix


def test_checkpoint_storage_not_shared_for_a_multi_node_run():
    view = cluster_from_file(AWS)
    finding = check_storage(raw_config("tiny_cpu"), view, [])
    assert not finding.ok and "'./runs'" in finding.problem and "NFS" in finding.fix
    assert not check_storage(raw_config("tiny_cpu", run={"storage_path": "/var/raylm"}), view, []).ok
    assert check_storage(raw_config("tiny_cpu", run={"storage_path": "/mnt/shared/raylm-runs"}), view, []).ok
    bucket = check_storage(raw_config("tiny_cpu", run={"storage_path": "s3://bucket/raylm"}), view, [])
    assert not bucket.ok and "s3fs" in bucket.fix
    assert check_storage(raw_config("tiny_cpu", run={"storage_path": "/nfs/x"}), view, ["/nfs"]).ok
    assert check_storage(raw_config("tiny_cpu", scaling={"num_workers": 1}), view, []).ok


def test_working_dir_too_large_names_what_is_large(big_working_dir):
    report = measure_working_dir(big_working_dir)
    assert report.zip_bytes is not None and report.zip_bytes >= upload_cap_bytes()
    problem, fix = report.problem_and_fix()
    assert "checkpoints/model.bin" in problem and "checkpoints/" in problem
    assert "--exclude" in fix
    assert measure_working_dir(big_working_dir, excludes=["checkpoints/"]).problem() is None


def test_typed_config_problems_are_reported():
    raw = raw_config("tiny_cpu", optim={"lr_max": 1.0})
    findings = run_preflight(raw, "crafted.yaml", None, None, None)
    (finding,) = problems(findings)
    assert "optim.lr_max: unknown key" in finding.problem


def test_cli_prints_every_problem_with_its_fix(quantized_lora_zero3, big_working_dir):
    """One run, four kinds of problem: each printed with its fix, exit code 1."""
    result = subprocess.run(
        [
            sys.executable, "-m", "cluster.preflight",
            "--config", str(quantized_lora_zero3),
            "--set", "scaling.num_workers=40",
            "--set", "run.storage_path=./runs",
            "--cluster-config", str(AWS),
            "--working-dir", str(big_working_dir),
        ],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    flagged = [line.split()[1] for line in out.splitlines() if line.strip().startswith("PROBLEM")]
    assert sorted(flagged) == ["capacity", "config", "storage", "working_dir"], out
    assert out.count("fix:") == len(flagged), out
    assert "quantized LoRA" in out and "checkpoints/model.bin" in out and "lower scaling.num_workers to 16" in out
    assert out.rstrip().splitlines()[-1].startswith("4 problem(s)")


def test_cli_passes_a_good_config_and_rejects_a_missing_file():
    ok = subprocess.run(
        [sys.executable, "-m", "cluster.preflight", "--config", "configs/pretrain/llama_125m_gpu.yaml", "--cluster-config", "cluster/gcp.yaml"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "0 problem(s)" in ok.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "cluster.preflight", "--config", "configs/pretrain/nope.yaml"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr
