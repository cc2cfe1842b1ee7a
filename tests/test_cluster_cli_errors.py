"""Inputs that used to end in a traceback now end in one clear message naming the key and the fix.

Each case runs the real CLI as a subprocess, as a user would, and checks the exit code, the message and
that no traceback reached stderr.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRYPOINT = ["--", "python", "-m", "training.pretrain", "--config", "configs/pretrain/tiny_cpu.yaml"]


def run_module(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", "RAY_AUTH"))}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)


def assert_no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr


@pytest.mark.parametrize(
    "override, expected",
    [
        ("scaling.num_workers=abc", "scaling.num_workers: 'abc' must be a count (2) or an elastic range [min, max]"),
        ("scaling.resources_per_worker={CPU: -1}", "scaling.resources_per_worker.CPU: -1.0 must be >= 0"),
        ("scaling=4", "scaling: Input should be a valid dictionary"),
    ],
)
def test_preflight_with_an_invalid_scaling_section_and_a_cluster_config(override, expected):
    """The capacity check needs the scaling section: an invalid one is reported as a problem with its fix,
    and the cluster checks say they were skipped (exit 1: problems found, as for every config problem)."""
    result = run_module("cluster.preflight", "--config", "configs/pretrain/tiny_cpu.yaml", "--set", override,
                        "--cluster-config", "cluster/aws.yaml")
    assert_no_traceback(result)
    assert result.returncode == 1, result.stdout + result.stderr
    assert expected in result.stdout, result.stdout
    assert "fix: edit the YAML or pass --set" in result.stdout
    assert "capacity, GPU and storage checks skipped" in result.stdout


def test_preflight_scaling_problems_of_a_config_kind_it_does_not_type_check(tmp_path):
    """A config with non-pretrain sections skips typed validation: its scaling section is still checked."""
    config = tmp_path / "finetune.yaml"
    config.write_text("peft: {method: lora}\nscaling: {num_workers: 0}\n", encoding="utf-8")
    result = run_module("cluster.preflight", "--config", str(config), "--cluster-config", "cluster/gcp.yaml")
    assert_no_traceback(result)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "PROBLEM scaling" in result.stdout and "scaling.num_workers: 0: worker counts must be greater than or equal to 1" in result.stdout


@pytest.mark.parametrize(
    "runtime_env, expected",
    [
        ('{"env_vars": ["A"]}', "env_vars must be a mapping of NAME: value, got list ['A']"),
        ('{"env_vars": {"A": 1}}', 'env_vars.A: value must be a string, got int 1; quote it, e.g. "A": "1"'),
        ('{"excludes": "runs/"}', "excludes must be a list of gitignore-style patterns"),
        ('{"working_dir": 3}', "working_dir must be a path or URI string"),
    ],
)
def test_submit_rejects_a_runtime_env_of_the_wrong_shape(runtime_env, expected):
    # Refused before any connection: the address is never dialled (exit 2, not 3).
    result = run_module("cluster.submit", "--address", "http://127.0.0.1:1", "--runtime-env-json", runtime_env, *ENTRYPOINT)
    assert_no_traceback(result)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr, result.stderr


def test_train_files_glob_matching_a_directory(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("hello\n", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("hello\n", encoding="utf-8")
    for spec in (f"{tmp_path}/*", str(tmp_path / "corpus")):
        result = run_module("training.pretrain", "--config", "configs/pretrain/tiny_cpu.yaml",
                            "--set", f"data.train_files=['{spec}']", "--set", f"run.storage_path={tmp_path / 'runs'}")
        assert_no_traceback(result)
        assert result.returncode == 2, result.stderr
        assert f"data.train_files: '{spec}' matches directory ['{tmp_path / 'corpus'}']" in result.stderr, result.stderr
        assert f"name files, e.g. '{tmp_path / 'corpus'}/*.txt'" in result.stderr
