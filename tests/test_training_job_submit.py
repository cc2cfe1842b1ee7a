"""The same YAML under `ray job submit` against a real `ray start --head` on 127.0.0.1."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GCS_PORT, DASHBOARD_PORT = 27379, 27265


@pytest.fixture(scope="module")
def head_node(tmp_path_factory):
    """A Ray head in its own process group (so tearing it down touches no other Ray on the machine)."""
    temp_dir = tmp_path_factory.mktemp("ray-head")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={GCS_PORT}", "--node-ip-address=127.0.0.1",
         "--num-cpus=4", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={DASHBOARD_PORT}", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    address = f"http://127.0.0.1:{DASHBOARD_PORT}"
    client_env = {**env, "RAY_AUTH_MODE": "token"} if (Path.home() / ".ray" / "auth_token").exists() else env
    deadline = time.time() + 120
    while time.time() < deadline:
        probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address],
                               env=client_env, capture_output=True, text=True)
        if probe.returncode == 0:
            break
        time.sleep(2)
    else:
        os.killpg(head.pid, signal.SIGKILL)
        pytest.fail(f"ray head did not come up on {address}: {probe.stderr[-2000:]}")
    yield address, client_env
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)


def test_ray_job_submit_runs_the_same_yaml(head_node, tmp_path):
    address, env = head_node
    storage = tmp_path / "shared-runs"
    cmd = [
        str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
        "python", "-m", "training.pretrain", "--config", "configs/pretrain/tiny_cpu.yaml",
        "--set", f"run.storage_path={storage}", "--set", "optim.max_steps=6", "--set", "optim.warmup_steps=2",
        "--set", "run.checkpoint_every_steps=3", "--set", "data.max_documents=800",
    ]
    job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    log = job.stdout + job.stderr
    assert job.returncode == 0, log[-4000:]
    assert "succeeded" in log
    assert "raylm-worker rank=1" in log and "[raylm] done: step 6" in log
    summary = json.loads((storage / "tiny-cpu" / "results.json").read_text())
    assert summary["final_step"] == 6
    assert (storage / "tiny-cpu" / "checkpoint_0000006" / "model" / "model.safetensors").is_file()
