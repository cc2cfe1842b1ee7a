"""Run configs: shipped YAMLs validate, bad ones fail naming the key, DeepSpeed JSON follows the fields."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from training.config import (
    ConfigError,
    PretrainConfig,
    config_class_for,
    load_any_config,
    load_config,
    load_config_of_kind,
    read_yaml,
    validate_config,
)
from training.deepspeed_config import build_deepspeed_config
from training.schedule import lr_multiplier

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").rglob("*.yaml"))
MINIMAL = {"data": {"train_files": ["corpus.txt"]}}


def with_change(section: str, key: str, value) -> dict:
    raw = yaml.safe_load(yaml.safe_dump(MINIMAL))
    raw.setdefault(section, {})[key] = value
    return raw


def test_shipped_configs_exist_and_validate():
    """Every YAML under configs/ validates with the typed class its `kind` names (absent = pretrain)."""
    assert len(SHIPPED) >= 3, SHIPPED
    for path in SHIPPED:
        raw = read_yaml(path)
        if raw.get("kind") == "tune":  # sweeps are tune's kind (tune imports training, never the reverse)
            from tune.config import load_sweep

            assert load_sweep(path).base.run.name, path
            continue
        if raw.get("kind") == "demo":  # make demo: its own config plus every stage config it names
            from demo.config import load_demo

            assert load_demo(path).pretrain_config.is_file(), path
            continue
        cls = config_class_for(raw)
        cfg = load_any_config(path)
        assert type(cfg) is cls, path
        assert cfg.kind == raw.get("kind", "pretrain"), path
        assert cfg.run.name, path
        if path.parent.name == "pretrain":
            assert isinstance(cfg, PretrainConfig), path


def test_config_kind_picks_the_class_and_unknown_kinds_are_named():
    from training.finetune_config import FinetuneConfig

    assert config_class_for(MINIMAL) is PretrainConfig
    assert config_class_for({**MINIMAL, "kind": "pretrain"}) is PretrainConfig
    assert config_class_for({"kind": "finetune"}) is FinetuneConfig
    from training.prune_config import PruneConfig

    assert config_class_for({"kind": "prune"}) is PruneConfig
    with pytest.raises(ConfigError, match="unknown config kind 'pretrian'"):
        config_class_for({"kind": "pretrian"})


def test_wrong_entry_point_for_the_kind_names_the_right_command(tmp_path):
    finetune_yaml = tmp_path / "ft.yaml"
    finetune_yaml.write_text(yaml.safe_dump({"kind": "finetune", "task": "sft"}))
    pretrain_yaml = tmp_path / "pt.yaml"
    pretrain_yaml.write_text(yaml.safe_dump(MINIMAL))
    with pytest.raises(ConfigError) as info:
        load_config_of_kind(finetune_yaml, [], "pretrain")
    assert len(info.value.problems) == 1 and "python -m training.finetune --config" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config_of_kind(pretrain_yaml, [], "finetune")
    assert len(info.value.problems) == 1 and "python -m training.pretrain --config" in str(info.value)
    out = subprocess.run([sys.executable, "-m", "training.pretrain", "--config", str(finetune_yaml), "--validate-only"],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2 and "python -m training.finetune" in out.stderr, out.stderr


@pytest.mark.parametrize(
    "raw, key, words",
    [
        (with_change("optim", "lrr", 1e-3), "optim.lrr", ["unknown key", "Did you mean 'lr'"]),
        ({**MINIMAL, "trainer": {}}, "trainer", ["unknown key", "Allowed keys here"]),
        (with_change("optim", "lr", -1.0), "optim.lr", ["greater than 0", "-1.0"]),
        (with_change("optim", "lr", "fast"), "optim.lr", ["valid number", "'fast'"]),
        (with_change("deepspeed", "zero_stage", 4), "deepspeed.zero_stage", ["0, 1, 2 or 3", "4"]),
        ({**MINIMAL, "deepspeed": {"zero_stage": 0, "offload_optimizer": True}}, "deepspeed.offload_optimizer", ["zero_stage"]),
        ({**MINIMAL, "deepspeed": {"zero_stage": 2, "offload_params": True}}, "deepspeed.offload_params", ["stage 3"]),
        (with_change("scaling", "num_workers", 0), "scaling.num_workers", ["greater than or equal to 1"]),
        ({**MINIMAL, "scaling": {"resources_per_worker": {"GPU": 1}}}, "scaling.resources_per_worker.GPU", ["use_gpu"]),
        (with_change("model", "num_heads", 5), "model.hidden_size", ["not divisible", "num_heads=5"]),
        ({**MINIMAL, "optim": {"warmup_steps": 50, "max_steps": 10}}, "optim.warmup_steps", ["smaller than optim.max_steps"]),
        (with_change("data", "seq_len", 4096), "data.seq_len", ["max_position_embeddings"]),
        (with_change("model", "source", "gguf"), "model.path", ["required"]),
        ({"optim": {"lr": 1e-3}}, "data", ["required but missing"]),
        (with_change("run", "name", "bad name/with slash"), "run.name", ["pattern"]),
        (with_change("run", "storage_path", "s3://bucket/runs"), "run.storage_path", ["mount the bucket"]),
        ({**MINIMAL, "deepspeed": {"precision": "fp16"}}, "deepspeed.precision", ["needs GPUs"]),
    ],
)
def test_bad_config_names_the_key(raw, key, words):
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    message = str(info.value)
    assert key in message, message
    for word in words:
        assert word in message, message


def test_all_problems_reported_at_once():
    raw = {"data": {"train_files": ["x.txt"], "seq_len": -1}, "optim": {"lr": 0, "lrr": 1}, "scaling": {"num_workers": 0}}
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    problems = info.value.problems
    assert len(problems) == 4, problems
    for key in ("data.seq_len", "optim.lr", "optim.lrr", "scaling.num_workers"):
        assert any(p.startswith(key) for p in problems), (key, problems)


def test_set_overrides_are_validated_by_the_same_schema(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    cfg = load_config(path, ["optim.lr=0.02", "deepspeed.zero_stage=3", "scaling.resources_per_worker={CPU: 2}"])
    assert cfg.optim.lr == 0.02 and cfg.deepspeed.zero_stage == 3
    assert cfg.scaling.worker_resources == {"CPU": 2.0}
    with pytest.raises(ConfigError, match=r"optim\.momentum: unknown key"):
        load_config(path, ["optim.momentum=0.9"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["optim.lr"])


def test_yaml_syntax_error_is_reported_with_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("data:\n  train_files: [a.txt\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_config_module_imports_without_torch():
    code = "import sys, training.config, training.deepspeed_config, training.schedule; " \
           "print(sorted(m for m in ('torch', 'ray', 'transformers', 'deepspeed') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_json_comes_from_the_typed_fields(stage):
    raw = {**MINIMAL, "optim": {"lr": 0.003, "micro_batch_size": 3, "grad_accum_steps": 5, "grad_clip": 0.5,
                                 "weight_decay": 0.01, "beta2": 0.99},
           "deepspeed": {"zero_stage": stage}}
    cfg = validate_config(raw)
    ds = build_deepspeed_config(cfg, world_size=4)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_batch_size"] == 3 * 5 * 4
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["gradient_clipping"] == 0.5
    params = ds["optimizer"]["params"]
    assert params["lr"] == 0.003 and params["betas"] == [0.9, 0.99] and params["weight_decay"] == 0.01
    assert "bf16" not in ds and "fp16" not in ds
    if stage >= 1:
        assert ds["zero_optimization"]["reduce_bucket_size"] == cfg.deepspeed.bucket_elements == 50_000_000
    small = build_deepspeed_config(validate_config({**raw, "deepspeed": {"zero_stage": stage, "bucket_elements": 200_000}}), 4)
    if stage >= 1:
        assert small["zero_optimization"]["allgather_bucket_size"] == 200_000


def test_deepspeed_json_offload_and_precision():
    cfg = validate_config({**MINIMAL, "deepspeed": {"zero_stage": 3, "offload_optimizer": True, "offload_params": True,
                                                    "precision": "bf16"}})
    ds = build_deepspeed_config(cfg, world_size=2)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["bf16"] == {"enabled": True}
    # Offload uses DeepSpeed's CPU Adam, not torch's.
    assert "torch_adam" not in ds["optimizer"]["params"]


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    optim = validate_config({**MINIMAL, "optim": {"warmup_steps": 10, "max_steps": 110, "min_lr_ratio": 0.1}}).optim
    factors = [lr_multiplier(s, optim) for s in range(110)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(factors[:10], factors[1:10]))
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert lr_multiplier(110, optim) == pytest.approx(0.1)
    assert factors[60] == pytest.approx(0.1 + 0.9 * 0.5)  # cosine midpoint


def test_credentials_in_uris_never_reach_saved_configs_or_trackers():
    from training.config import load_any_config

    kind_file = "configs/pretrain/tiny_cpu.yaml"
    secret_uri = "https://alice:s3cr3t-pw@mlflow.internal:5000/?token=abc123&experiment=7"
    cfg = load_any_config(REPO / kind_file, [f"run.mlflow_tracking_uri={secret_uri}"])
    assert cfg.run.mlflow_tracking_uri == secret_uri  # the run itself still uses the real URI
    saved, dumped = cfg.to_yaml(), cfg.redacted_dump()
    for text in (saved, str(dumped)):
        assert "s3cr3t-pw" not in text and "abc123" not in text and "alice" not in text
    assert dumped["run"]["mlflow_tracking_uri"] == "https://***@mlflow.internal:5000/?token=***&experiment=7"
    assert load_any_config(REPO / kind_file).redacted_dump()["run"]["mlflow_tracking_uri"] is None
