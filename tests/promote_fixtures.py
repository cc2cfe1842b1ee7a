"""Shared by the promote tests: a tiny base export, a held-out test file and two adapters of known quality.

`good` is a LoRA trained in-process for a few steps (plain torch, no Ray Train) on review chats like the test
file's; `bad` has random LoRA weights (serving.tiny_exports); `other` fits another base (hidden size 32).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml

from serving.export_format import AdapterManifest, base_shape_of, read_export
from serving.tiny_exports import build_causal_lm_export, build_lora_adapter
from training.finetune_data import encode_sft

REPO = Path(__file__).resolve().parents[1]
REVIEWS = REPO / "configs" / "finetune" / "data" / "review_chat.jsonl"
NAME = "reviews"


def train_lora_adapter(base: Path, rows: list[dict], out: Path, *, steps: int = 30, seed: int = 0) -> Path:
    """A LoRA adapter trained in-process (plain torch AdamW) on chat rows, written as training.export --adapter does."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, use_safetensors=True),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    examples = [e for e in (encode_sft(tokenizer, r["messages"], max_len=200) for r in rows) if e]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for step in range(steps):
        batch = [examples[(step * 8 + i) % len(examples)] for i in range(8)]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([i + [tokenizer.pad_token_id] * (width - len(i)) for i, _ in batch])
        labels = torch.tensor([l + [-100] * (width - len(l)) for _, l in batch])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out, safe_serialization=True)
    base_manifest = read_export(base).manifest
    manifest = AdapterManifest(adapter=True, task="causal-lm", base_model=base_manifest.model_name, peft_type="LORA",
                               base_shape=base_shape_of(json.loads((base / "config.json").read_text())),
                               model_name=out.name, trained_steps=steps)
    (out / "raylm.json").write_text(manifest.model_dump_json(indent=2))
    return out


def build_world(root: Path) -> dict:
    """A tiny base export, a held-out test file of review chats, and adapters of known quality, under root."""
    base = build_causal_lm_export(root / "tiny-llama", hidden_size=64, num_layers=2, vocab_size=512, max_seq_len=256)
    rows = [json.loads(line) for line in REVIEWS.read_text(encoding="utf-8").splitlines()]
    test_file = root / "test.jsonl"
    test_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:24]), encoding="utf-8")
    good = train_lora_adapter(base, rows[24:184], root / "good")
    bad = build_lora_adapter(base, root / "bad", seed=3)
    other_base = build_causal_lm_export(root / "other-base", hidden_size=32, num_layers=2, vocab_size=512)
    return {"root": root, "base": base, "test": test_file, "good": good, "bad": bad,
            "other": build_lora_adapter(other_base, root / "other-adapter", seed=1)}


def setup_served(world, tmp_path, served: Path | None) -> Path:
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    if served is not None:
        shutil.copytree(served, adapters / NAME)
    return adapters


def write_config(world, tmp_path, adapters: Path, candidate: Path | str, test_file: Path | None = None, **evaluation) -> Path:
    raw = {"kind": "promote",
           "served": {"base": str(world["base"]), "adapters_dir": str(adapters), "adapter_name": NAME},
           "candidate": {"path": str(candidate)},
           "evaluation": {"task": "sft", "files": [str(test_file or world["test"])], "batch_size": 8, **evaluation},
           "run": {"name": "promote-test"}}
    path = tmp_path / "promote.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path
