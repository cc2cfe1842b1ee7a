"""The model a fine-tune trains: the base (raylm export, HF dir, GGUF) with the task's head, under a peft method.

Used by the workers (training) and by the export (merging an adapter back into the same base), so
both see the very same architecture. The base's embeddings are never resized.
"""

from __future__ import annotations

from pathlib import Path

from training.finetune_config import DEFAULT_LORA_TARGETS, FinetuneConfig

PEFT_TASK_TYPES = {"sft": "CAUSAL_LM", "classification": "SEQ_CLS", "ner": "TOKEN_CLS"}
HEAD_NAMES = ("classifier", "score")  # the task heads of BERT-family / decoder classifiers in transformers


def _auto_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification

    return {"sft": AutoModelForCausalLM, "classification": AutoModelForSequenceClassification,
            "ner": AutoModelForTokenClassification}[task]


def load_base(cfg: FinetuneConfig, base_path: str | Path, labels: list[str], pad_token_id: int):
    """The base in fp32 with the task's head (new heads initialised from cfg.run.seed: the same on every rank)."""
    import torch

    torch.manual_seed(cfg.run.seed)
    path = Path(base_path)
    kwargs: dict = {"local_files_only": True, "dtype": torch.float32}
    if cfg.task != "sft":
        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={label: i for i, label in enumerate(labels)})
    if cfg.model.source == "gguf":
        model = _auto_class(cfg.task).from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
        if hasattr(model.config, "quantization_config"):  # dequantized on load: the weights are plain fp32
            del model.config.quantization_config
    else:
        model = _auto_class(cfg.task).from_pretrained(
            str(path), use_safetensors=True, trust_remote_code=cfg.model.trust_remote_code, **kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id  # decoder classifiers find the last real token by it
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model


def lora_targets(cfg: FinetuneConfig, model_type: str) -> list[str]:
    if cfg.method.lora.target_modules:
        return list(cfg.method.lora.target_modules)
    if model_type not in DEFAULT_LORA_TARGETS:
        raise ValueError(f"method.lora.target_modules: no default for model_type '{model_type}'; list the module "
                         f"names to adapt (defaults exist for {', '.join(DEFAULT_LORA_TARGETS)})")
    return list(DEFAULT_LORA_TARGETS[model_type])


def peft_config(cfg: FinetuneConfig, model, tokenizer_dir: str | None = None):
    """The peft config of cfg.method for this model (None for full fine-tuning)."""
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, PromptTuningInit

    method, task_type = cfg.method, PEFT_TASK_TYPES[cfg.task]
    if method.type == "full":
        return None
    if method.type == "lora":
        heads = [name for name in HEAD_NAMES if hasattr(model, name)] if cfg.task != "sft" else None
        return LoraConfig(
            task_type=task_type, r=method.lora.r, lora_alpha=method.lora.alpha, lora_dropout=method.lora.dropout,
            target_modules=lora_targets(cfg, model.config.model_type),
            modules_to_save=heads or None,  # the new head trains in full and is saved with the adapter
        )
    if method.type == "prompt_tuning":
        if method.prompt_init_text:
            return PromptTuningConfig(task_type=task_type, num_virtual_tokens=method.num_virtual_tokens,
                                      prompt_tuning_init=PromptTuningInit.TEXT,
                                      prompt_tuning_init_text=method.prompt_init_text,
                                      tokenizer_name_or_path=tokenizer_dir)
        return PromptTuningConfig(task_type=task_type, num_virtual_tokens=method.num_virtual_tokens)
    return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=method.num_virtual_tokens)


def build_finetune_model(cfg: FinetuneConfig, base_path: str | Path, labels: list[str], pad_token_id: int,
                         tokenizer_dir: str | None = None):
    """Base + head, wrapped by peft unless method is full. Same seed, same model on every rank."""
    import torch

    model = load_base(cfg, base_path, labels, pad_token_id)
    config = peft_config(cfg, model, tokenizer_dir)
    if config is None:
        return model
    from peft import get_peft_model

    torch.manual_seed(cfg.run.seed + 1)  # adapter init: identical on every rank
    return get_peft_model(model, config)


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) unique parameters, before DeepSpeed partitions them."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def base_shape(config) -> dict:
    """The facts of the base's config an adapter depends on (serving compares them with the served model)."""
    return {"model_type": config.model_type, "hidden_size": int(config.hidden_size),
            "num_hidden_layers": int(config.num_hidden_layers), "vocab_size": int(config.vocab_size)}
