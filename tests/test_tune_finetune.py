"""A real LoRA fine-tuning sweep: Ray Tune over 2-worker DeepSpeed LoRA runs of a tiny Llama (sft).

The base is a tiny Llama raylm export (2 layers, hidden 64; serving.tiny_exports), the data the chat
sample shipped in configs/finetune/data. The sweep is `tune.search.main`, exactly what the command
line runs: data prepared once on the driver, each trial built by training.finetune's own builder,
the best trial's adapter published into a served adapters directory.
"""

import json
from pathlib import Path

import pytest
import yaml

from serving.export_format import adapter_problems, list_adapters, read_adapter, read_export
from training.schedule import lr_multiplier
from training.finetune_config import FinetuneConfig
from training.tracking import read_metrics
from tune import search

pytestmark = pytest.mark.slow
SWEEP_TIMEOUT_S = 1800  # ~2-3 min on a quiet 2-core machine; far longer when many test runs share it
DATA = Path(__file__).resolve().parents[1] / "configs" / "finetune" / "data"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    from serving.tiny_exports import build_causal_lm_export

    return build_causal_lm_export(tmp_path_factory.mktemp("base") / "tiny-llama", hidden_size=64, num_layers=2,
                                  vocab_size=512, max_seq_len=256, initializer_range=0.02)


def lora_base(tiny_llama: Path) -> dict:
    """A 2-worker LoRA sft of 6 steps; 2 x 0.5 CPU per trial, so two trials run at once on 4 logical CPUs."""
    return {
        "kind": "finetune",
        "task": "sft",
        "model": {"source": "raylm_export", "path": str(tiny_llama)},
        "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}},
        "data": {"train_files": [str(DATA / "review_chat.jsonl")], "max_examples": 96, "val_fraction": 0.2,
                 "max_len": 160},
        "optim": {"lr": 5e-3, "warmup_steps": 1, "max_steps": 6, "micro_batch_size": 4, "weight_decay": 0.0},
        "deepspeed": {"zero_stage": 2, "bucket_elements": 200_000},
        "scaling": {"num_workers": 2, "resources_per_worker": {"CPU": 0.5}},
        "run": {"checkpoint_every_steps": 3, "eval_every_steps": 3, "eval_batches": 4, "log_every_steps": 3,
                "max_failures": 0, "keep_checkpoints": 1},
    }


@pytest.mark.timeout(SWEEP_TIMEOUT_S)
def test_lora_sweep_over_rank_and_lr_publishes_the_best_adapter(local_ray, tiny_llama, tmp_path):
    raw = {"kind": "tune", "name": "lora-sweep", "storage_path": str(tmp_path / "sweeps"), "base": lora_base(tiny_llama),
           # No metric given: the sweep tunes the fine-tune's own selection metric (sft: val_loss, min).
           "space": {"method.lora.r": "grid([2, 8])", "optim.lr": "loguniform(1e-3, 2e-2)"},
           "num_samples": 1, "search": {"type": "random", "seed": 3}}
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(raw))
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    assert search.main(["--config", str(config), "--publish-to", str(adapters), "--adapter-name", "best-lora"]) == 0
    check_lora_sweep(tmp_path / "sweeps" / "lora-sweep", adapters, tiny_llama)


def check_lora_sweep(sweep_dir: Path, adapters: Path, tiny_llama: Path) -> None:
    """What the sweep left: trials run with their sampled rank and lr, the best one's adapter published."""
    rows = json.loads((sweep_dir / "trials.json").read_text())
    assert sorted(r["method.lora.r"] for r in rows) == [2, 8]
    assert all(r["status"] == "completed" and r["steps"] == 6 for r in rows), rows
    for row in rows:
        run_dir = Path(row["run_dir"])
        # Each trial trained with its sampled rank (peft's own config of its checkpoints) and lr (the
        # lr its workers logged at step 3, after warmup, follows the sampled peak lr's schedule).
        checkpoints = [p for p in sorted(run_dir.glob("checkpoint_*")) if (p / "model").is_dir()]
        assert checkpoints, run_dir
        for ckpt in checkpoints:
            assert json.loads((ckpt / "model" / "adapter_config.json").read_text())["r"] == row["method.lora.r"]
        resolved = checkpoints[-1] / "resolved_config.yaml"
        cfg = FinetuneConfig.model_validate(yaml.safe_load(resolved.read_text()))
        assert cfg.method.lora.r == row["method.lora.r"] and cfg.optim.lr == pytest.approx(row["optim.lr"])
        logged = {r["step"]: r["lr"] for r in read_metrics(run_dir) if "lr" in r}
        assert logged[3] == pytest.approx(row["optim.lr"] * lr_multiplier(2, cfg.optim), rel=1e-6)

    # The best trial by the tuned metric is the one published: a fine-tune exports each run's best
    # checkpoint, so trials rank by each run's lowest val_loss (from its own log).
    lowest = {r["trial"]: min(m["val_loss"] for m in read_metrics(Path(r["run_dir"])) if "val_loss" in m) for r in rows}
    best = json.loads((sweep_dir / "best.json").read_text())
    assert best["trial"] == min(lowest, key=lowest.get) and best["best_val_loss"] == pytest.approx(lowest[best["trial"]])
    published = adapters / "best-lora"
    adapter = read_adapter(published)  # serving's reader
    assert list_adapters(adapters) == ["best-lora"]  # staged outside the served names, renamed into place
    assert Path(adapter.manifest.source_checkpoint).resolve().parent == Path(best["run_dir"]).resolve()
    assert json.loads((published / "adapter_config.json").read_text())["r"] == best["method.lora.r"]
    from safetensors import safe_open

    with safe_open(str(published / "adapter_model.safetensors"), "pt") as weights:
        lora_a = [k for k in weights.keys() if "lora_A" in k]
        assert lora_a and all(weights.get_slice(k).get_shape()[0] == best["method.lora.r"] for k in lora_a)
    assert adapter.manifest.base_model == read_export(tiny_llama).manifest.model_name
    assert adapter.manifest.model_name == "best-lora"  # the served name, not the winning trial's run name
    assert adapter.manifest.task == "causal-lm"
    assert adapter_problems(adapter, read_export(tiny_llama)) == []

    # Serving's engine loads it onto the base it was trained on.
    from serving.generation import CausalLMEngine

    engine = CausalLMEngine(read_export(tiny_llama), adapters_dir=str(adapters))
    engine.load_adapter("best-lora")
    assert engine.resident_adapters == ["best-lora"]
