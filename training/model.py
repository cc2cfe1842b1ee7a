"""Build the causal LM: a Llama-style network from config, or a local HF directory / GGUF file."""

from __future__ import annotations

from pathlib import Path

from training.config import ModelSection, resolve_data_path


def llama_config(section: ModelSection, vocab_size: int, pad_token_id: int, eos_token_id: int):
    """The transformers LlamaConfig for a from-scratch model (2-layer test size up to 1B+)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=section.hidden_size,
        intermediate_size=section.resolved_intermediate_size,
        num_hidden_layers=section.num_layers,
        num_attention_heads=section.num_heads,
        num_key_value_heads=section.num_kv_heads or section.num_heads,
        max_position_embeddings=section.max_position_embeddings,
        rope_theta=section.rope_theta,
        tie_word_embeddings=section.tie_word_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        attention_dropout=0.0,
    )


def build_model(section: ModelSection, vocab_size: int, pad_token_id: int, eos_token_id: int, seed: int):
    """Return an fp32 causal LM with deterministic initialisation (the same on every rank)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    torch.manual_seed(seed)
    if section.source == "scratch":
        model = LlamaForCausalLM(llama_config(section, vocab_size, pad_token_id, eos_token_id))
    else:
        path = Path(resolve_data_path(section.path))
        if section.source == "gguf":
            model = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, local_files_only=True, dtype=torch.float32
            )
            # A GGUF load records how the file was quantized; the dequantized weights are plain fp32.
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
        else:
            model = AutoModelForCausalLM.from_pretrained(
                str(path), local_files_only=True, dtype=torch.float32,
                trust_remote_code=section.trust_remote_code, use_safetensors=True,
            )
        if model.get_input_embeddings().num_embeddings < vocab_size:
            model.resize_token_embeddings(vocab_size)
    if section.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    return model


def count_parameters(model) -> int:
    """Unique trainable parameters (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() if not hasattr(p, "ds_numel") else p.ds_numel
    return total
