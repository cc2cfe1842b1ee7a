"""Checkpoint completeness (manifest written last) and the resize arithmetic; real files, no Ray.

The runs that actually resume on another worker count are in test_training_elastic.py.
"""

import json
from pathlib import Path

import pytest

from training.checkpoints import (
    MANIFEST,
    checkpoint_dir_name,
    latest_complete_checkpoint,
    manifest_problem,
    scan_checkpoints,
    write_manifest,
)
from training.config import ConfigError, validate_config
from training.export import find_checkpoint
from training.finetune import FINETUNE_MEANING_KEYS
from training.pretrain import PRETRAIN_MEANING_KEYS
from training.universal import accumulation_for, convert_to_universal, plan_resume


def fake_checkpoint(run_dir: Path, step: int, world: int = 2, stage: int = 2, manifest: bool = True) -> Path:
    """A checkpoint's file layout with stand-in bytes: enough for the manifest logic, never loaded."""
    ckpt = run_dir / checkpoint_dir_name(step)
    (ckpt / "ds").mkdir(parents=True)
    (ckpt / "model").mkdir()
    for rank in range(world):
        (ckpt / "ds" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(bytes([rank]) * 5000)
    (ckpt / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"m" * 3000)
    (ckpt / "model" / "model.safetensors").write_bytes(b"w" * 2000)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": world, "global_batch_rows": 8}))
    (ckpt / "resolved_config.yaml").write_text("run: {}\n")
    if manifest:
        write_manifest(ckpt, {"step": step, "world_size": world, "zero_stage": stage})
    return ckpt


def test_complete_checkpoint_verifies(tmp_path):
    ckpt = fake_checkpoint(tmp_path, 4)
    assert manifest_problem(ckpt) is None
    listed = json.loads((ckpt / MANIFEST).read_text())["files"]
    assert "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt" in listed and listed["model/model.safetensors"]["size"] == 2000


@pytest.mark.parametrize("damage", ["truncate_shard", "delete_shard", "delete_manifest", "flip_byte", "garbage_manifest"])
def test_half_written_checkpoint_is_never_chosen(tmp_path, damage):
    """Resume, export and conversion all skip a damaged newest checkpoint and take the one before."""
    good = fake_checkpoint(tmp_path, 4)
    bad = fake_checkpoint(tmp_path, 8)
    shard = bad / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    if damage == "truncate_shard":
        shard.write_bytes(shard.read_bytes()[:1000])
    elif damage == "delete_shard":
        shard.unlink()
    elif damage == "delete_manifest":
        (bad / MANIFEST).unlink()
    elif damage == "flip_byte":
        shard.write_bytes(b"\x07" + shard.read_bytes()[1:])
    else:
        (bad / MANIFEST).write_text('{"files": ')
    warnings = []
    assert latest_complete_checkpoint(tmp_path, warn=warnings.append) == good  # resume
    assert len(warnings) == 1 and bad.name in warnings[0]
    complete, skipped = scan_checkpoints(tmp_path)
    assert complete == [good] and [p for p, _ in skipped] == [bad]
    assert find_checkpoint(tmp_path) == good  # export of the run directory
    with pytest.raises(FileNotFoundError, match="incomplete checkpoint"):
        find_checkpoint(bad)  # export of that checkpoint by name
    with pytest.raises(ValueError, match="never converted"):
        convert_to_universal(bad)
    with pytest.raises(ValueError, match="never resumed"):
        plan_resume(bad, world_size=1, micro_batch_size=4, zero_stage=2)
    assert not (bad / "universal").exists()


def test_run_without_complete_checkpoint_has_nothing_to_resume(tmp_path):
    fake_checkpoint(tmp_path, 4, manifest=False)
    assert latest_complete_checkpoint(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="complete raylm checkpoint"):
        find_checkpoint(tmp_path)


def test_universal_copy_is_not_part_of_the_checkpoint_manifest(tmp_path):
    """The converted copy is written after the manifest; the checkpoint still verifies beside it."""
    ckpt = fake_checkpoint(tmp_path, 4)
    (ckpt / "universal").mkdir()
    (ckpt / "universal" / "x.pt").write_bytes(b"u")
    (ckpt / ".universal-tmp-123").mkdir()
    assert manifest_problem(ckpt) is None


def test_resize_keeps_the_global_batch_by_accumulation(tmp_path):
    assert accumulation_for(8, 4, 1) == 2
    assert accumulation_for(8, 4, 2) == 1
    with pytest.raises(ValueError, match=r"run on one of \[1, 2\] workers"):
        accumulation_for(8, 4, 3)
    ckpt = fake_checkpoint(tmp_path, 4, world=2, stage=2)
    plan = plan_resume(ckpt, world_size=1, micro_batch_size=4, zero_stage=2)
    assert (plan.load_universal, plan.grad_accum_steps, plan.load_dir) == (True, 2, ckpt / "universal")
    same = plan_resume(ckpt, world_size=2, micro_batch_size=4, zero_stage=2)
    assert (same.load_universal, same.grad_accum_steps, same.load_dir) == (False, 1, ckpt)
    with pytest.raises(ValueError, match="deepspeed.zero_stage: 2"):
        plan_resume(ckpt, world_size=1, micro_batch_size=4, zero_stage=3)
    stage0 = fake_checkpoint(tmp_path / "s0", 4, world=2, stage=0)
    assert plan_resume(stage0, world_size=1, micro_batch_size=4, zero_stage=0).load_universal is False
    with pytest.raises(ValueError, match="nothing to convert"):
        convert_to_universal(stage0)


def test_elastic_range_in_config():
    base = {"data": {"train_files": ["x.txt"]}}
    cfg = validate_config({**base, "scaling": {"num_workers": [1, 2]}})
    assert (cfg.scaling.is_elastic, cfg.scaling.min_workers, cfg.scaling.max_workers) == (True, 1, 2)
    assert cfg.global_batch_blocks == cfg.optim.micro_batch_size * 2
    for bad, says in [([2, 1], "min <= max"), ([1, 2, 3], "elastic range"), ("two", "elastic range"), ([0, 2], "greater than or equal to 1"),
                      ([2, 3], "multiple of 2")]:
        with pytest.raises(ConfigError, match=says):
            validate_config({**base, "scaling": {"num_workers": bad}})
    assert validate_config({**base, "scaling": {"num_workers": [2, 3]}, "optim": {"grad_accum_steps": 2}})


def _resume_config(tmp_path, *sets):
    """The shipped tiny pretraining config pointed at a run directory under tmp_path, tokenizer at its defaults."""
    from training.config import load_config

    overrides = [f"run.storage_path={tmp_path}", "run.name=old", "tokenizer={}", *sets]
    return load_config(Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny_cpu.yaml", overrides)


def test_resume_check_fills_defaults_for_keys_and_null_sections_older_checkpoints_lack(tmp_path):
    import yaml

    from training.driver import check_resume

    cfg = _resume_config(tmp_path)
    ckpt = fake_checkpoint(cfg.run_dir, 4, world=cfg.scaling.max_workers, manifest=False)
    saved = cfg.model_dump(mode="json")
    saved["tokenizer"] = None  # a null section written by an older raylm
    del saved["model"]["rope_theta"], saved["deepspeed"]["bucket_elements"]  # keys older checkpoints lack
    saved["model"]["gradient_checkpointing"] = not cfg.model.gradient_checkpointing  # changes no checkpoint meaning
    (ckpt / "resolved_config.yaml").write_text(yaml.safe_dump(saved))
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 4, "world_size": cfg.scaling.max_workers,
                                                         "global_batch_rows": cfg.optim.micro_batch_size
                                                         * cfg.optim.grad_accum_steps * cfg.scaling.max_workers}))
    write_manifest(ckpt, {"step": 4})
    assert check_resume(cfg, PRETRAIN_MEANING_KEYS) == str(ckpt)

    changed = _resume_config(tmp_path, f"model.hidden_size={cfg.model.hidden_size * 2}")
    with pytest.raises(ConfigError, match=rf"model.hidden_size: checkpoint has {cfg.model.hidden_size}, config now says"):
        check_resume(changed, PRETRAIN_MEANING_KEYS)


def test_resume_check_refuses_a_checkpoint_without_its_resolved_config(tmp_path):
    from training.driver import check_resume

    cfg = _resume_config(tmp_path)
    ckpt = fake_checkpoint(cfg.run_dir, 4, world=cfg.scaling.max_workers, manifest=False)
    (ckpt / "resolved_config.yaml").unlink()
    write_manifest(ckpt, {"step": 4})
    with pytest.raises(ConfigError, match="has no resolved_config.yaml"):
        check_resume(cfg, PRETRAIN_MEANING_KEYS)


def _checkpoint_of(cfg, step: int = 4) -> Path:
    """A checkpoint of `cfg`'s run whose resolved_config.yaml is `cfg` itself, with a verifying manifest."""
    ckpt = fake_checkpoint(cfg.run_dir, step, world=cfg.scaling.max_workers, manifest=False)
    (ckpt / "resolved_config.yaml").write_text(cfg.to_yaml())
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": cfg.scaling.max_workers,
                                                         "global_batch_rows": cfg.optim.micro_batch_size
                                                         * cfg.optim.grad_accum_steps * cfg.scaling.max_workers}))
    write_manifest(ckpt, {"step": step})
    return ckpt


def test_resume_check_compares_only_what_changes_the_checkpoints_meaning(tmp_path):
    """Training settings, cadences and paths may change on resume; model shape, tokenizer and ZeRO
    sharding may not, and every refused key is named with both values."""
    from training.driver import check_resume

    cfg = _resume_config(tmp_path)
    ckpt = _checkpoint_of(cfg)
    free = _resume_config(tmp_path, "optim.lr=0.01", "optim.max_steps=999", "optim.warmup_steps=0", "run.eval_every_steps=7",
                          "run.checkpoint_every_steps=3", "data.seq_len=32", f"data.prepared_dir={tmp_path / 'p'}",
                          "model.gradient_checkpointing=true", "deepspeed.bucket_elements=20000")
    assert check_resume(free, PRETRAIN_MEANING_KEYS) == str(ckpt)

    other_stage = 3 if cfg.deepspeed.zero_stage != 3 else 1
    changed = _resume_config(tmp_path, f"model.hidden_size={cfg.model.hidden_size * 2}", "optim.lr=0.01",
                             f"deepspeed.zero_stage={other_stage}", "tokenizer.vocab_size=5000")
    with pytest.raises(ConfigError) as refused:
        check_resume(changed, PRETRAIN_MEANING_KEYS)
    message = str(refused.value)
    assert f"model.hidden_size: checkpoint has {cfg.model.hidden_size}, config now says {cfg.model.hidden_size * 2}; " \
           "restore it or pick a new run.name" in message
    assert f"deepspeed.zero_stage: checkpoint has {cfg.deepspeed.zero_stage}, config now says {other_stage}" in message
    assert f"tokenizer.vocab_size: checkpoint has {cfg.tokenizer.vocab_size}, config now says 5000" in message
    assert "optim.lr" not in message


def _finetune_config(tmp_path, **changes):
    raw = {"kind": "finetune", "task": "classification", "model": {"source": "hf_dir", "path": str(tmp_path / "base")},
           "method": {"type": "lora", "lora": {"r": 8}}, "data": {"train_files": ["reviews.csv"]},
           "scaling": {"num_workers": 1}, "run": {"storage_path": str(tmp_path), "name": "ft"}}
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return validate_config(raw)


def test_finetune_resume_check_refuses_another_adapter_shape_and_allows_another_lr(tmp_path):
    from training.driver import check_resume

    cfg = _finetune_config(tmp_path)
    ckpt = _checkpoint_of(cfg)
    assert check_resume(_finetune_config(tmp_path, optim__lr=0.5, optim__max_steps=70, method__lora__dropout=0.2,
                                         data__max_len=64, run__eval_every_steps=3), FINETUNE_MEANING_KEYS) == str(ckpt)
    for key, value, says in [("method__lora__r", 16, "method.lora.r: checkpoint has 8, config now says 16"),
                             ("task", "ner", "task: checkpoint has 'classification', config now says 'ner'"),
                             ("model__path", "/elsewhere", "model.path: checkpoint has"),
                             ("deepspeed__zero_stage", 3, "deepspeed.zero_stage: checkpoint has 2, config now says 3")]:
        with pytest.raises(ConfigError, match=says):
            check_resume(_finetune_config(tmp_path, **{key: value}), FINETUNE_MEANING_KEYS)


def test_resume_data_check_refuses_another_vocabulary_or_label_set(tmp_path):
    from training.driver import check_resume_data

    def tokenizer(where: Path, vocab: dict) -> Path:
        where.mkdir(parents=True)
        (where / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab}, "added_tokens": [
            {"id": len(vocab), "content": "<|endoftext|>"}]}))
        return where

    ckpt = tmp_path / "checkpoint_000004"
    tokenizer(ckpt / "tokenizer", {"a": 0, "b": 1, "ab": 2})
    (ckpt / "finetune.json").write_text(json.dumps({"labels": ["neg", "pos"]}))
    same = tokenizer(tmp_path / "same", {"a": 0, "b": 1, "ab": 2})
    check_resume_data(str(ckpt), str(same), ["neg", "pos"])
    check_resume_data(None, str(tmp_path / "nowhere"), ["x"])  # nothing to resume: nothing to compare

    retrained = tokenizer(tmp_path / "retrained", {"a": 0, "b": 1, "ba": 2})
    with pytest.raises(ConfigError, match=r"tokenizer: checkpoint_000004 was trained with a vocabulary of 4 tokens.*2 token/id pairs differ"):
        check_resume_data(str(ckpt), str(retrained), ["neg", "pos"])
    with pytest.raises(ConfigError, match=r"labels: checkpoint has \['neg', 'pos'\], the data now gives \['neg', 'neutral', 'pos'\]"):
        check_resume_data(str(ckpt), str(same), ["neg", "neutral", "pos"])


def test_resume_data_check_refuses_another_ner_input_format(tmp_path):
    """An NER checkpoint from before data.ner_input read each text once: resumed where 'auto' now gives
    'doubled', the shards would go on training on another input format, so it is refused with the fix."""
    from training.driver import check_resume_data

    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    old = tmp_path / "checkpoint_000002"
    old.mkdir()
    (old / "finetune.json").write_text(json.dumps({"task": "ner", "labels": ["O", "B-PER"]}))  # no ner_input key
    check_resume_data(str(old), str(tokenizer_dir), ["O", "B-PER"], "single")
    with pytest.raises(ConfigError, match=r"data\.ner_input: checkpoint_000002 was trained reading each text 'single', "
                                          r"the data now gives 'doubled'; set data\.ner_input: single"):
        check_resume_data(str(old), str(tokenizer_dir), ["O", "B-PER"], "doubled")
    new = tmp_path / "checkpoint_000004"
    new.mkdir()
    (new / "finetune.json").write_text(json.dumps({"task": "ner", "labels": ["O"], "ner_input": "doubled"}))
    check_resume_data(str(new), str(tokenizer_dir), ["O"], "doubled")
    with pytest.raises(ConfigError, match=r"trained reading each text 'doubled', the data now gives 'single'"):
        check_resume_data(str(new), str(tokenizer_dir), ["O"], "single")


def test_data_preparation_os_errors_are_one_line_with_the_fix(tmp_path):
    from training.driver import data_error_message

    denied = PermissionError(13, "Permission denied", str(tmp_path / "data"))
    message = data_error_message(denied)
    assert message.startswith("data: cannot read or write the prepared data") and "Permission denied" in message
    assert "free disk space of data.prepared_dir" in message
    assert data_error_message(OSError(28, "No space left on device")).count("No space left on device") == 1
    assert data_error_message(FileNotFoundError("data.train_files: no file matches")) == "data: data.train_files: no file matches"
