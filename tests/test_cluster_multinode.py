"""A real multi-node Ray cluster on this machine: a head and a worker node, each its own `ray start`.

One cluster for the whole module (ports 26500+, token auth on). On it:
- job submission with auth: no token and a wrong token are refused with a clear message; the token works,
  and `cluster.submit --wait` exits with the job's outcome;
- preflight against the live cluster;
- the tiny 2-worker pretraining job, submitted with `cluster.submit --wait`, places its workers on two
  different nodes; the worker node is killed mid-run and started again, and the job still finishes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cluster.local import LocalCluster
from cluster.local_state import process_alive, session_members

REPO = Path(__file__).resolve().parents[1]
BASE_PORT = 26500
WORKER_LINE = re.compile(r"raylm-worker rank=(\d+) node_id=([0-9a-f]+)")
STEP_LINE = re.compile(r"\[raylm\] step (\d+)/(\d+)")
MAX_STEPS = 30

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def cluster():
    local = LocalCluster(f"/tmp/raylm-test-{BASE_PORT}", base_port=BASE_PORT, head_cpus=4, worker_cpus=4)
    local.down()  # a cluster left by an interrupted earlier run of this module
    local.up(workers=1)
    yield local
    local.down()


@pytest.fixture(scope="module")
def client_home(tmp_path_factory) -> Path:
    """A HOME without ~/.ray/auth_token, so only the token a test passes is used."""
    return tmp_path_factory.mktemp("home")


def client_env(cluster: LocalCluster, home: Path, token: bool = True, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", "RAY_AUTH"))}
    env.update(HOME=str(home), RAY_ADDRESS=cluster.state.dashboard_url, RAY_USAGE_STATS_ENABLED="0")
    if token:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=cluster.state.token_path)
    env.update(extra)
    return env


def run_cli(module: str, args: list[str], env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


# -------------------------------------------------------------------------------------------------
# The cluster itself


def test_head_and_worker_are_separate_nodes(cluster):
    nodes = [n for n in cluster.nodes() if n["state"] == "ALIVE"]
    assert len(nodes) == 2
    heads = [n for n in nodes if n["is_head_node"]]
    assert len(heads) == 1
    assert {k for n in nodes for k in n["resources_total"] if k.startswith("raylm_")} == {"raylm_head_node", "raylm_worker_node"}
    sessions = [node.pid for node in cluster.state.nodes.values()]
    assert len(set(sessions)) == 2 and all(session_members(s) for s in sessions), "each node is its own process session"
    assert cluster.state.dashboard_url.startswith("http://127.0.0.1:")


# -------------------------------------------------------------------------------------------------
# Submission with auth on


def test_submit_without_token_is_refused(cluster, client_home, tmp_path):
    no_token = run_cli("cluster.submit", ["--no-working-dir", "--", "python", "-c", "print(1)"], client_env(cluster, client_home, token=False))
    assert no_token.returncode == 3, no_token.stderr
    assert "token auth on and no token was sent" in no_token.stderr and "ray get-auth-token" in no_token.stderr
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 64)
    wrong_token = run_cli(
        "cluster.submit", ["--no-working-dir", "--token-file", str(wrong), "--", "python", "-c", "print(1)"],
        client_env(cluster, client_home, token=False),
    )
    assert wrong_token.returncode == 3, wrong_token.stderr
    assert "refused the token" in wrong_token.stderr


def test_submit_with_token_runs_and_exit_code_follows_the_job(cluster, client_home):
    env = client_env(cluster, client_home)
    ok = run_cli("cluster.submit", ["--wait", "--no-working-dir", "--", "python", "-c", "print('hello from the cluster')"], env)
    assert ok.returncode == 0, ok.stderr
    assert "hello from the cluster" in ok.stdout
    assert re.search(r"job \S+ SUCCEEDED", ok.stderr)
    failed = run_cli(
        "cluster.submit",
        ["--wait", "--no-working-dir", "--submission-id", f"raylm-fail-{os.getpid()}", "--", "python", "-c", "import sys; sys.exit(3)"],
        env,
    )
    assert failed.returncode == 1, failed.stderr
    assert f"job raylm-fail-{os.getpid()} FAILED" in failed.stderr and "exit code 3" in failed.stderr


def test_preflight_against_the_live_cluster(cluster, client_home):
    env = client_env(cluster, client_home)
    fits = run_cli("cluster.preflight", ["--config", "configs/pretrain/tiny_cpu.yaml"], env)
    assert fits.returncode == 0, fits.stdout + fits.stderr
    assert "fit now (room for 8)" in fits.stdout and "one machine" in fits.stdout
    gpus = run_cli("cluster.preflight", ["--config", "configs/pretrain/llama_125m_gpu.yaml"], env)
    assert gpus.returncode == 1
    assert re.search(r"PROBLEM gpus .*no node in cluster at http://127.0.0.1:\d+ has GPUs", gpus.stdout), gpus.stdout


# -------------------------------------------------------------------------------------------------
# Tiny pretraining across both nodes, losing the worker node mid-run


@pytest.fixture(scope="module")
def spread_run(cluster, client_home, tmp_path_factory):
    """Submit tiny pretraining with `cluster.submit --wait`; kill worker-1 after the first checkpoint; restart it.

    Returns what happened: the submit exit code, the node ids before and after, each attempt's rank -> node.
    """
    storage = tmp_path_factory.mktemp("runs")
    command = [
        sys.executable, "-m", "cluster.submit", "--wait", "--timeout", "720",
        "--", "python", "-m", "training.pretrain", "--config", "configs/pretrain/tiny_cpu.yaml",
        "--set", "scaling.placement_strategy=STRICT_SPREAD",
        "--set", "run.max_failures=3",
        "--set", f"optim.max_steps={MAX_STEPS}",
        "--set", f"run.eval_every_steps={MAX_STEPS}",  # evaluate once, at the end: this test is about placement
        "--set", f"run.storage_path={storage}",
    ]
    nodes_before = {n["node_id"]: n["is_head_node"] for n in cluster.nodes() if n["state"] == "ALIVE"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=client_env(cluster, client_home))
    lines: list[str] = []
    before_kill: dict[int, str] = {}  # rank -> node id, as each worker reported it at start
    after_kill: dict[int, str] = {}
    killed_at_step = killed_node = None
    started = time.monotonic()
    try:
        for line in process.stdout:
            lines.append(line)
            worker = WORKER_LINE.search(line)
            if worker and killed_at_step is None:
                before_kill[int(worker[1])] = worker[2]
            elif worker and worker[2] != killed_node:  # the dead node's lines can still arrive late
                after_kill[int(worker[1])] = worker[2]
            step = STEP_LINE.search(line)
            if step and killed_at_step is None and int(step[1]) > 10:  # the step-10 checkpoint is saved
                killed_at_step = int(step[1])
                killed_node = next((n for n in before_kill.values() if nodes_before.get(n) is False), None)
                cluster.stop_node("worker-1", kill=True)
                # Bring the node back while the job waits for a second node (STRICT_SPREAD).
                threading.Timer(3.0, cluster.start_node, args=("worker-1",), kwargs={"wait": False}).start()
        exit_code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    cluster.wait_for_nodes(2, timeout_s=120)
    nodes_after = {n["node_id"]: n["is_head_node"] for n in cluster.nodes() if n["state"] == "ALIVE"}
    results = storage / "tiny-cpu" / "results.json"
    return {
        "exit_code": exit_code,
        "log": "".join(lines),
        "seconds": time.monotonic() - started,
        "nodes_before": nodes_before,
        "nodes_after": nodes_after,
        "first_attempt": before_kill,
        "restarted_attempt": after_kill,
        "killed_at_step": killed_at_step,
        "results": json.loads(results.read_text()) if results.exists() else None,
    }


def test_pretrain_job_places_its_workers_on_two_nodes(spread_run):
    first = spread_run["first_attempt"]
    assert sorted(first) == [0, 1], spread_run["log"][-3000:]
    assert first[0] != first[1], "rank 0 and rank 1 ran on the same node"
    assert set(first.values()) == set(spread_run["nodes_before"]), "the workers ran on this cluster's head and worker node"


def test_job_survives_losing_the_worker_node(spread_run):
    log_tail = spread_run["log"][-4000:]
    assert spread_run["killed_at_step"] is not None, f"the run ended before the worker node could be killed:\n{log_tail}"
    assert spread_run["exit_code"] == 0, log_tail
    assert re.search(r"job \S+ SUCCEEDED", spread_run["log"])
    restarted = spread_run["restarted_attempt"]
    assert sorted(restarted) == [0, 1], f"no restarted worker group after the kill:\n{log_tail}"
    new_worker_node = set(spread_run["nodes_after"]) - set(spread_run["nodes_before"])
    assert len(new_worker_node) == 1, "worker-1 came back as a new node"
    assert set(restarted.values()) == set(spread_run["nodes_after"]), "the restarted group spans the head and the new node"
    assert spread_run["results"]["final_step"] == MAX_STEPS
    print(f"\nspread run: {spread_run['seconds']:.0f} s, worker node killed at step {spread_run['killed_at_step']}")


# -------------------------------------------------------------------------------------------------
# Last: stopping the cluster stops exactly its own processes


def test_down_stops_every_process_of_the_cluster(cluster):
    sessions = [node.pid for node in cluster.state.nodes.values()]
    members = [pid for s in sessions for pid in session_members(s)]
    assert members
    cluster.down()
    assert all(not process_alive(pid) for pid in members), "a process of the cluster survived `down`"
    assert all(node.pid is None for node in cluster.state.nodes.values())
