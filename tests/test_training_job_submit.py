"""The same YAML under `ray job submit` against a real `ray start --head` on 127.0.0.1."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from local_ports import free_port

from cluster.auth import auth_headers, find_token

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GCS_PORT, DASHBOARD_PORT = 27379, 27265


def job_api_problem(address: str, headers: dict[str, str]) -> str | None:
    """None once the dashboard's job API answers 200 to a job listing, else why not."""
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{address}/api/jobs/", headers=headers), timeout=10) as reply:
            return None if reply.status == 200 else f"HTTP {reply.status}"
    except OSError as err:  # connection refused while the head starts; HTTPError (401/403/5xx) is an OSError too
        return repr(err)


@pytest.fixture(scope="module")
def head_node(tmp_path_factory):
    """A Ray head in its own process group (so tearing it down touches no other Ray on the machine)."""
    temp_dir = tmp_path_factory.mktemp("ray-head")
    # RAY_ADDRESS: the head's processes that look the cluster up without an address (Ray Train's PlacementGroupCleaner)
    # find this head, not "multiple active Ray instances" when other Rays run on the machine.
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ADDRESS": f"127.0.0.1:{GCS_PORT}"}
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={GCS_PORT}", "--node-ip-address=127.0.0.1",
         "--num-cpus=4", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={DASHBOARD_PORT}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
         # The dashboard agent's HTTP port is a fixed 52365 by default: with another Ray on the machine holding
         # it, this head's agent never registers and every submit answers "No available agent to submit job".
         f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    address = f"http://127.0.0.1:{DASHBOARD_PORT}"
    token_on = (Path.home() / ".ray" / "auth_token").exists()  # `ray start --head` then turns token auth on
    client_env = {**env, "RAY_AUTH_MODE": "token"} if token_on else env
    # Ask the job API itself (what `ray job list` asks) every 0.5 s, with the token when auth is on: a `ray job
    # list` per probe spent ~2 s importing Ray on the cores the starting head needs.
    headers = auth_headers(find_token()) if token_on else {}
    deadline = time.time() + 120
    while time.time() < deadline:
        problem = job_api_problem(address, headers)
        if problem is None:
            break
        time.sleep(0.5)
    else:
        os.killpg(head.pid, signal.SIGKILL)
        pytest.fail(f"ray head did not come up on {address}: {problem}")
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
    assert "| 2 workers |" in log and "[raylm] done: step 6" in log
    # On one node the console leaves out where each rank runs; the run's driver.log keeps every worker's lines.
    assert "raylm-worker rank=1" not in log
    assert "raylm-worker rank=1" in (storage / "tiny-cpu" / "driver.log").read_text()
    summary = json.loads((storage / "tiny-cpu" / "results.json").read_text())
    assert summary["final_step"] == 6
    assert (storage / "tiny-cpu" / "checkpoint_0000006" / "model" / "model.safetensors").is_file()
