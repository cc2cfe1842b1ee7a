"""`python -m cluster.submit` refuses what cannot work before sending anything.

Submissions to a real cluster (auth, log tailing, exit codes) are in test_cluster_multinode.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from local_ports import free_port

from cluster.submit import build_request, parse_args
from cluster.workdir import upload_cap_bytes

REPO = Path(__file__).resolve().parents[1]
ENTRYPOINT = ["--", "python", "-m", "training.pretrain", "--config", "configs/pretrain/tiny_cpu.yaml"]


def submit(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", "RAY_AUTH"))}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "cluster.submit", *args], capture_output=True, text=True, cwd=cwd, env=full_env, timeout=120)


@pytest.fixture(scope="module")
def big_project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bigproject")
    (root / "training").mkdir()
    (root / "training" / "pretrain.py").write_text("print('hi')\n")
    (root / "configs" / "pretrain").mkdir(parents=True)
    (root / "configs" / "pretrain" / "tiny_cpu.yaml").write_text("data: {train_files: [x.txt]}\n")
    (root / "data").mkdir()
    with open(root / "data" / "corpus.bin", "wb") as f:
        f.write(os.urandom(upload_cap_bytes() + 2**20))
    return root


def test_working_dir_over_the_upload_cap_is_refused_before_sending(big_project):
    # Nothing listens on the address: exit code 2 (refused before submitting), not 3 (unreachable).
    result = submit("--address", f"http://127.0.0.1:{free_port()}", "--working-dir", str(big_project), *ENTRYPOINT)
    assert result.returncode == 2, result.stderr
    assert "data/corpus.bin" in result.stderr and "100.0 MiB cap" in result.stderr and "--exclude" in result.stderr
    # Excluding the large file leaves a submission that gets as far as the (absent) cluster.
    result = submit("--address", f"http://127.0.0.1:{free_port()}", "--working-dir", str(big_project), "--exclude", "data/", *ENTRYPOINT)
    assert result.returncode == 3, result.stderr
    assert "cannot reach the Ray job server" in result.stderr


def test_every_problem_is_reported_at_once(tmp_path):
    (tmp_path / "configs").mkdir()
    result = submit(
        "--working-dir", str(tmp_path),
        "--entrypoint-resources", "{not json",
        "--submission-id", "bad id!",
        "--env", "NOEQUALS",
        "--", "python", "-m", "training.pretrian", "--config", "configs/pretrain/nope.yaml",
    )
    assert result.returncode == 2
    for expected in ("no cluster address", "--entrypoint-resources", "--submission-id", "--env 'NOEQUALS'",
                     "module 'training.pretrian' not found", "configs/pretrain/nope.yaml' does not exist"):
        assert expected in result.stderr, (expected, result.stderr)


def test_address_comes_from_ray_address_and_runtime_env_is_built(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:26999")
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-a-real-token")
    args = parse_args(["--env", "A=1", "--exclude", "data/", "--entrypoint-resources", '{"raylm_head_node": 0.01}', *ENTRYPOINT])
    request = build_request(args)
    assert request.address == "http://127.0.0.1:26999"
    assert request.runtime_env["working_dir"] == str(REPO)
    assert request.runtime_env["env_vars"] == {"A": "1"}
    assert "data/" in request.runtime_env["excludes"] and "runs/" in request.runtime_env["excludes"]
    assert request.entrypoint == "python -m training.pretrain --config configs/pretrain/tiny_cpu.yaml"
    assert request.entrypoint_resources == {"raylm_head_node": 0.01}
    assert request.token.source == "RAY_AUTH_TOKEN"


def test_missing_token_file_is_a_clear_error(tmp_path):
    result = submit("--address", "http://127.0.0.1:1", "--token-file", str(tmp_path / "nope"), *ENTRYPOINT)
    assert result.returncode == 2
    assert "token file" in result.stderr and "ray get-auth-token" in result.stderr
