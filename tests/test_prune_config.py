"""`kind: prune` configs: the shipped example validates, every bad value is named with its fix, all at once,
and the inputs (export, text files, output directory) are checked before any model loads."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from training.config import ConfigError, config_class_for, validate_config
from training.prune_config import PruneConfig

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "configs" / "prune" / "smollm2_quarter_cpu.yaml"
MINIMAL = {"kind": "prune", "model": {"path": "exports/x"}, "calibration": {"files": ["text.txt"]},
           "prune": {"methods": ["layers"], "num_layers": 2}, "output": {"dir": "exports/y"}}


def with_changes(changes: dict) -> dict:
    raw = yaml.safe_load(yaml.safe_dump(MINIMAL))
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return raw


def test_shipped_example_validates_as_a_prune_config():
    cfg = validate_config(yaml.safe_load(EXAMPLE.read_text()))
    assert isinstance(cfg, PruneConfig) and config_class_for({"kind": "prune"}) is PruneConfig
    assert cfg.prune.methods == ["layers", "mlp_width"] and cfg.heal.method.type == "lora"
    heal = cfg.heal_finetune_config("/tmp/pruned", "/tmp/heal.jsonl")  # healing is a normal sft fine-tune
    assert heal.kind == "finetune" and heal.task == "sft" and heal.model.source == "raylm_export"
    assert heal.optim.max_steps == 40 and heal.scaling.num_workers == 2 and heal.run_dir == cfg.run_dir / "heal"


BAD = [
    ({"prune.num_layers": None}, ["prune: set exactly one target"]),
    ({"prune.param_fraction": 0.25}, ["prune: set exactly one target"]),
    ({"prune.methods": ["mlp_width"]}, ["prune.num_layers: a layer count is a target for methods [layers] only"]),
    ({"prune.methods": ["layers", "layers"]}, ["lists a method twice"]),
    ({"prune.methods": ["heads"]}, ["prune.methods.0: Input should be 'layers' or 'mlp_width'"]),
    ({"prune.methods": []}, ["prune.methods: List should have at least 1 item"]),
    ({"prune.num_layers": None, "prune.param_fraction": 0.95}, ["prune.param_fraction: Input should be less than 0.9"]),
    ({"prune.layer_share": 0.3}, ["prune.layer_share: only splits the target between two methods"]),
    ({"calibration.files": []}, ["calibration.files: List should have at least 1 item"]),
    ({"calibration.seq_len": 4}, ["calibration.seq_len: Input should be greater than or equal to 8"]),
    ({"output": None}, ["output: required but missing"]),
    ({"heal": {"method": {"type": "prefix_tuning"}}}, ["heal.method.type: prefix_tuning cannot be merged"]),
    ({"heal": {"optim": {"max_steps": 5, "warmup_steps": 5}}}, ["heal.optim.warmup_steps: 5 must be smaller"]),
    ({"heal": {"data": {"train_files": ["chat.jsonl"], "packing": True}, "method": {"type": "full"}}}, []),
    ({"heal": {"data": {"train_files": ["chat.jsonl"]}, "method": {"type": "lora"}}, "deepspeed": {"precision": "fp16"}},
     ["deepspeed.precision: fp16 needs GPUs"]),
    ({"prune.typo": 1}, ["prune.typo: unknown key. Allowed keys here: methods, param_fraction"]),
]


@pytest.mark.parametrize("changes, expected", BAD, ids=[",".join(c) for c, _ in BAD])
def test_bad_values_are_named_with_the_key_and_the_fix(changes, expected):
    raw = with_changes(changes)
    if not expected:
        assert validate_config(raw).heal.data.packing  # packing sft rows is allowed when healing
        return
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    text = "\n".join(info.value.problems)
    for fragment in expected:
        assert fragment in text, text


def test_every_problem_is_reported_at_once():
    raw = with_changes({"prune.methods": ["mlp_width"], "calibration.num_sequences": 0, "run.name": "bad name!",
                        "scaling": {"num_workers": 0}, "evaluation": {"speed_batches": []}})
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    text = "\n".join(info.value.problems)
    for key in ("prune.num_layers", "calibration.num_sequences", "run.name", "scaling.num_workers",
                "evaluation.speed_batches"):
        assert key in text, text


def test_validate_only_checks_the_inputs_and_names_each_missing_one(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "file").write_text("x")
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump(with_changes({"model.path": str(tmp_path / "no-export"),
                                                   "calibration.files": [str(tmp_path / "none*.txt")],
                                                   "output.dir": str(out)})))
    result = subprocess.run([sys.executable, "-m", "training.prune", "--config", str(config), "--validate-only"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "3 problem(s)" in result.stderr
    for fragment in ("model.path:", "export directory does not exist", "calibration.files: no file matches",
                     "output.dir:", "output.replace: true"):
        assert fragment in result.stderr, result.stderr
    wrong_kind = subprocess.run([sys.executable, "-m", "training.finetune", "--config", str(config), "--validate-only"],
                                capture_output=True, text=True, cwd=REPO, timeout=120)
    assert wrong_kind.returncode == 2 and "python -m training.prune --config" in wrong_kind.stderr, wrong_kind.stderr
