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
    assert check_resume(cfg, ("model", "data", "tokenizer", "deepspeed")) == str(ckpt)

    changed = _resume_config(tmp_path, f"model.hidden_size={cfg.model.hidden_size * 2}")
    with pytest.raises(ConfigError, match=rf"model.hidden_size: checkpoint has {cfg.model.hidden_size}, config now says"):
        check_resume(changed, ("model", "data", "tokenizer", "deepspeed"))


def test_resume_check_refuses_a_checkpoint_without_its_resolved_config(tmp_path):
    from training.driver import check_resume

    cfg = _resume_config(tmp_path)
    ckpt = fake_checkpoint(cfg.run_dir, 4, world=cfg.scaling.max_workers, manifest=False)
    (ckpt / "resolved_config.yaml").unlink()
    write_manifest(ckpt, {"step": 4})
    with pytest.raises(ConfigError, match="has no resolved_config.yaml"):
        check_resume(cfg, ("model", "data", "tokenizer", "deepspeed"))


def test_data_preparation_os_errors_are_one_line_with_the_fix(tmp_path):
    from training.driver import data_error_message

    denied = PermissionError(13, "Permission denied", str(tmp_path / "data"))
    message = data_error_message(denied)
    assert message.startswith("data: cannot read or write the prepared data") and "Permission denied" in message
    assert "free disk space of data.prepared_dir" in message
    assert data_error_message(OSError(28, "No space left on device")).count("No space left on device") == 1
    assert data_error_message(FileNotFoundError("data.train_files: no file matches")) == "data: data.train_files: no file matches"
