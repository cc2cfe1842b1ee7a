"""An elastic run on a real 2-node cluster (cluster.local): lose a node for good, go on with 1 worker, grow back to 2.

The head has room for one worker ({CPU: 2} of its 3 CPUs; the spare CPU feeds Ray Data), the worker
node for the other, so the worker count follows the nodes. `scaling.num_workers: [1, 2]`: the run
starts on 2 workers; the worker node is SIGKILLed (like a lost VM) and the run restarts from its
last checkpoint on 1 worker (a universal conversion: the checkpoint was written by 2); when the
node returns, Ray Train's resize monitor restarts the run on 2 workers from the checkpoint the
1-worker run wrote (a second conversion). The run must end at max_steps with a sensible loss.

After the kill, Ray Train first tries to restart on 2 workers (its view of the cluster's resources still counts the
lost node) and waits for their placement group until RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S before it tries 1.
The nodes run with 10 s instead of Ray's 60 s (an unplaceable group is given up 50 s sooner; a placeable one is ready
in well under a second), so the first 1-worker step came 32 s after the kill instead of 78 s (one run each).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.local import LocalCluster
from training.tracking import read_metrics

REPO = Path(__file__).resolve().parents[1]
BASE_PORT = 26700
STEP_LINE = re.compile(r"\[raylm\] step (\d+)/(\d+) .*\| (\d+) workers? \|")
# Long enough that the 1-worker run is still going when the worker node is back and Ray Train's resize
# monitor (every 5 s) sees it: ray start + registration alone take 5-15 s, and a step ~0.3 s (less on a faster
# machine: 200 leaves the 1-worker run ~50 s after the kill even at 0.2 s a step).
MAX_STEPS = 200
# Read by the Train controller, which runs on a node of the cluster (not in this process): see the module docstring.
NODE_ENV = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def cluster():
    local = LocalCluster(f"/tmp/raylm-test-{BASE_PORT}", base_port=BASE_PORT, head_cpus=3, worker_cpus=2,
                         extra_env=NODE_ENV)
    local.down()  # a cluster left by an interrupted earlier run of this module
    local.up(workers=1)
    yield local
    local.down()


def test_elastic_run_shrinks_on_node_loss_and_grows_back(cluster, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", "RAY_AUTH"))}
    env.update(HOME=str(tmp_path), RAY_USAGE_STATS_ENABLED="0", **cluster.state.client_env())
    storage = tmp_path / "runs"
    command = [
        sys.executable, "-m", "cluster.submit", "--wait", "--timeout", "800",
        "--", "python", "-m", "training.pretrain", "--config", "configs/pretrain/tiny_cpu.yaml",
        "--set", "scaling.num_workers=[1, 2]",
        "--set", "scaling.resources_per_worker={CPU: 2}",
        "--set", "scaling.elastic_resize_monitor_interval_s=5",
        "--set", "run.max_failures=4",
        "--set", f"optim.max_steps={MAX_STEPS}",
        "--set", "run.checkpoint_every_steps=5",
        "--set", f"run.eval_every_steps={MAX_STEPS}",
        "--set", f"run.storage_path={storage}",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
    lines, phase, events = [], "grow", []  # phases: on 2 workers -> node killed -> on 1 worker -> node back -> on 2
    killed_at, shrink_s = None, None  # when the node was killed; how long until the first step on 1 worker
    try:
        for line in process.stdout:
            lines.append(line)
            match = STEP_LINE.search(line)
            if not match:
                continue
            step, workers = int(match[1]), int(match[3])
            if phase == "grow" and workers == 2 and step > 5:  # the step-5 checkpoint, written by 2 workers, exists
                cluster.stop_node("worker-1", kill=True)
                killed_at = time.monotonic()
                events.append(("killed worker node", step))
                phase = "shrunk"
            if phase == "shrunk" and workers == 1 and shrink_s is None:
                shrink_s = time.monotonic() - killed_at
            if phase == "shrunk" and workers == 1 and step >= events[-1][1] + 6:  # a 1-worker checkpoint exists
                # Waits until the node is ALIVE (restarting a `ray start` that gave up on Ray's fixed 30 s
                # registration wait on a loaded machine); the run goes on on 1 worker meanwhile.
                cluster.start_node("worker-1", wait=True, timeout_s=300)
                events.append(("worker node back", step))
                phase = "regrown"
        exit_code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    log_tail = "".join(lines)[-5000:]
    assert exit_code == 0, log_tail
    assert phase == "regrown", f"events {events}:\n{log_tail}"

    records = read_metrics(storage / "tiny-cpu")
    worlds = [r["world_size"] for r in records]
    assert records[-1]["step"] == MAX_STEPS
    # The world size per step went 2 -> 1 -> 2 (steps the lost group had already done are redone on 1).
    changes = [w for i, w in enumerate(worlds) if i == 0 or w != worlds[i - 1]]
    assert changes == [2, 1, 2], (worlds, events)
    conversions = [r for r in records if "universal_conversion_s" in r]
    assert {(r["resumed_from_world_size"], r["world_size"]) for r in conversions} == {(2, 1), (1, 2)}
    assert records[-1]["loss"] < records[0]["loss"] - 0.5, "it learned across the resizes"
    results = json.loads((storage / "tiny-cpu" / "results.json").read_text())
    assert results["final_step"] == MAX_STEPS
    print(f"\nelastic run: events {events}, first 1-worker step {shrink_s:.0f} s after the kill, "
          f"world size per step {worlds}")
