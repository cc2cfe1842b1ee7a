"""Serving's reader of the export contract written by `python -m training.export`.

An export directory holds `config.json` + `model.safetensors` (transformers `save_pretrained`),
the tokenizer files of `tokenizer.save_pretrained`, `raylm.json` (the manifest below) and,
informationally, `resolved_config.yaml`. A LoRA adapter directory holds `adapter_config.json`,
`adapter_model.safetensors` and a `raylm.json` with `"adapter": true`.

This module imports neither torch nor transformers, so configs can be validated anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

EXPORT_FORMAT = "raylm-export"
SUPPORTED_FORMAT_VERSIONS = (1,)
Task = Literal["causal-lm", "sequence-classification", "token-classification"]
# How a token-classification model reads a text: once, or "text <sep> text" with predictions read on the
# second copy (every token of which a causal model sees after the whole first copy: right context).
NerInput = Literal["single", "doubled"]

MODEL_FILES = ("config.json", "model.safetensors")
TOKENIZER_FILES = ("tokenizer_config.json",)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class ExportFormatError(ValueError):
    """The directory does not follow the export contract; the message names the file and the fix."""


class PruningRecord(BaseModel):
    """What `python -m training.prune` removed, and from which export (absent in exports that were not pruned)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    source_model: str = Field(min_length=1, description="model_name of the export that was pruned.")
    source_path: str = Field(min_length=1, description="Its directory when pruned.")
    methods: list[Literal["layers", "mlp_width"]]
    removed_layers: list[int] = Field(default_factory=list, description="Decoder layers removed (source indices).")
    num_layers: tuple[int, int] = Field(description="Decoder layers (before, after).")
    intermediate_size: tuple[int, int] = Field(description="MLP width (before, after).")
    parameters: tuple[int, int] = Field(description="Parameters (before, after).")
    healing: str | None = Field(None, description="lora / full when the pruned model was healed by a fine-tune, else None.")
    healing_steps: int | None = None


class ExportManifest(BaseModel):
    """`raylm.json` of a full model export."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    format: Literal["raylm-export"]
    format_version: int
    task: Task
    model_name: str = Field(min_length=1)
    max_seq_len: int = Field(gt=0)
    labels: list[str] = Field(default_factory=list)
    adapter: Literal[False] = False
    pruning: PruningRecord | None = Field(None, description="Set by training.prune; older exports have none.")
    ner_tag_subtoken: Literal["first", "last"] = Field(
        "first", description="token-classification: the sub-token of a word whose prediction is the word's tag. "
        "'first' for bidirectional encoders; 'last' for causal decoders, which have seen a word whole only at its "
        "last sub-token (older exports: 'first', as they were trained).")
    ner_input: NerInput = Field(
        "single", description="token-classification: 'single' (the text once) or 'doubled' (the text's token ids, "
        "ner_separator_token_id, the same ids again; predictions are read on the second copy, whose tokens a causal "
        "decoder sees after the whole text: right context). Older exports: 'single'. Built by doubled_input.")
    ner_separator_token_id: int | None = Field(
        None, ge=0, description="ner_input 'doubled': the token id between the two copies (the base's eos).")

    @model_validator(mode="after")
    def _check(self) -> "ExportManifest":
        if self.format_version not in SUPPORTED_FORMAT_VERSIONS:
            raise ValueError(
                f"format_version {self.format_version} is not supported by this serving version "
                f"(supports {list(SUPPORTED_FORMAT_VERSIONS)}); re-export with a matching raylm"
            )
        if self.task != "causal-lm" and not self.labels:
            raise ValueError(f"labels: required (non-empty) for task '{self.task}'")
        if self.ner_input == "doubled" and (self.task != "token-classification" or self.ner_separator_token_id is None):
            raise ValueError("ner_input: 'doubled' is for token-classification exports and needs ner_separator_token_id")
        if self.task == "token-classification":
            bad = [t for t in self.labels if t != "O" and not (t[:2] in ("B-", "I-") and len(t) > 2)]
            if bad:
                raise ValueError(f"labels: NER labels must be BIO tags ('O', 'B-X', 'I-X'); got {bad}")
        return self


def ner_copy_max_len(max_len: int, ner_input: str) -> int:
    """Tokens one copy of the text may take within max_len: all of them, or for 'doubled' as many as let both
    copies and the separator fit (longer texts are truncated to it by training and refused by serving)."""
    return (max_len - 1) // 2 if ner_input == "doubled" else max_len


def doubled_input(ids: list[int], separator_token_id: int) -> list[int]:
    """The 'doubled' NER input of a text's token ids (with the tokenizer's special tokens, if it adds any):
    ids, the separator, ids again. Token j of the text is read at position len(ids) + 1 + j."""
    return [*ids, separator_token_id, *ids]


class AdapterManifest(BaseModel):
    """`raylm.json` of a LoRA adapter directory."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    format: Literal["raylm-export"] = "raylm-export"
    format_version: int = 1
    adapter: Literal[True]
    task: Task
    base_model: str = Field(min_length=1, description="model_name of the export the adapter was trained on.")
    peft_type: Literal["LORA", "PROMPT_TUNING", "PREFIX_TUNING"] = Field(
        "LORA", description="peft's PeftType; serving batches LoRA adapters only."
    )
    base_shape: dict[str, int | str] = Field(
        default_factory=dict,
        description="Facts of the base's config.json the adapter depends on (model_type, hidden_size, "
        "num_hidden_layers, vocab_size); serving refuses an adapter whose facts differ from the served model's.",
    )
    labels: list[str] = Field(default_factory=list, description="The head's labels (classification / NER adapters).")
    # How a token-classification adapter reads a text, as ExportManifest's fields of the same names; None on
    # other tasks, so a merged model's own settings stay in force where the adapter says nothing.
    ner_tag_subtoken: Literal["first", "last"] | None = None
    ner_input: NerInput | None = None
    ner_separator_token_id: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "AdapterManifest":
        if self.ner_input == "doubled" and (self.task != "token-classification" or self.ner_separator_token_id is None):
            raise ValueError("ner_input: 'doubled' is for token-classification adapters and needs ner_separator_token_id")
        return self

    def ner_reading(self) -> dict:
        """The NER settings this adapter was trained with (only those it records), to apply over its base's."""
        return {key: value for key in ("ner_tag_subtoken", "ner_input", "ner_separator_token_id")
                if (value := getattr(self, key)) is not None}


class ModelExport(BaseModel):
    """A validated export directory."""

    model_config = ConfigDict(frozen=True)

    path: Path
    manifest: ExportManifest
    id2label: dict[int, str] = Field(default_factory=dict)
    has_chat_template: bool = False

    @property
    def task(self) -> Task:
        return self.manifest.task


class AdapterExport(BaseModel):
    """A validated LoRA adapter directory."""

    model_config = ConfigDict(frozen=True)

    name: str
    path: Path
    manifest: AdapterManifest


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportFormatError(f"{path}: missing {what}") from None
    except json.JSONDecodeError as exc:
        raise ExportFormatError(f"{path}: not valid JSON ({exc}); re-run the export") from None


def _require_files(directory: Path, names: tuple[str, ...], why: str) -> None:
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise ExportFormatError(
            f"{directory}: missing {', '.join(missing)} ({why}); point the path at a directory written by "
            "`python -m training.export <checkpoint> <out_dir>`"
        )


def _check_safetensors(path: Path) -> None:
    """A truncated or corrupt safetensors file fails here, named, instead of inside torch/peft (where a
    half-loaded adapter could already have changed the served model)."""
    fix = "re-run the export (write elsewhere and rename into place, so readers never see a partial file)"
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
        if header_len <= 0 or 8 + header_len > size:
            raise ExportFormatError(f"{path}: not a safetensors file (bad header length); {fix}")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ExportFormatError(f"{path}: not a safetensors file (header is not JSON); {fix}") from None
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
            and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2]
    if not isinstance(header, dict) or 8 + header_len + max(ends, default=0) > size:
        raise ExportFormatError(f"{path}: safetensors file is truncated; {fix}")


def _validation_message(path: Path, exc: ValidationError) -> str:
    problems = [f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()]
    return f"{path}: " + "; ".join(problems)


def _id2label(config_path: Path, config: dict) -> dict[int, str]:
    raw = config.get("id2label") or {}
    if not isinstance(raw, dict):
        raise ExportFormatError(f"{config_path}: id2label must be an object {{\"0\": \"label\", ...}}; re-export the model")
    bad = [k for k in raw if not (isinstance(k, str) and k.strip().lstrip("-").isdigit())]
    if bad:
        raise ExportFormatError(
            f"{config_path}: id2label keys must be integer class ids (\"0\", \"1\", ...); got {bad[:5]}. "
            "Fix: write id2label as {\"<id>\": \"<label>\"} (transformers: config.id2label = dict(enumerate(labels))) "
            "and re-export"
        )
    return {int(k): str(v) for k, v in raw.items()}


def adapter_problems(adapter: AdapterExport, base: ModelExport) -> list[str]:
    """Why `adapter` cannot be batched on the served `base` (empty when it can): another task, a peft
    method other than LoRA (prompt/prefix tuning change the sequence, so requests cannot share a
    batch), or a base whose config.json facts differ from the ones the adapter was trained on."""
    problems = []
    manifest = adapter.manifest
    if manifest.task != base.task:
        problems.append(f"the adapter is for task '{manifest.task}', the served model is '{base.task}'")
    peft_config = _read_json(adapter.path / "adapter_config.json", "adapter_config.json")
    peft_types = {manifest.peft_type, str(peft_config.get("peft_type", "LORA")).upper()}
    for peft_type in sorted(peft_types - {"LORA"}):
        problems.append(f"peft_type {peft_type} cannot be batched by this server (LoRA adapters only); "
                        "serve a merged export of it instead")
    if manifest.base_shape:
        config = _read_json(base.path / "config.json", "config.json")
        differ = [f"{key}: adapter {value!r}, served {config.get(key)!r}"
                  for key, value in sorted(manifest.base_shape.items()) if config.get(key) != value]
        if differ:
            problems.append(f"it was trained on another base model ('{manifest.base_model}'): " + ", ".join(differ))
    return problems


BASE_SHAPE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")


def base_shape_of(config: dict) -> dict[str, int | str]:
    """The facts of a base's config.json that an adapter records as `base_shape`."""
    return {key: config[key] for key in BASE_SHAPE_KEYS if key in config}


def read_export(directory: str | Path) -> ModelExport:
    """Validate an export directory and return its manifest; raises ExportFormatError naming what is wrong."""
    path = Path(directory).expanduser().resolve()
    if not path.is_dir():
        raise ExportFormatError(f"{path}: export directory does not exist")
    raw = _read_json(path / "raylm.json", "raylm.json (the export manifest)")
    try:
        manifest = ExportManifest.model_validate(raw)
    except ValidationError as exc:
        raise ExportFormatError(_validation_message(path / "raylm.json", exc)) from None
    _require_files(path, MODEL_FILES, "model weights and architecture; weights load from safetensors only")
    _require_files(path, TOKENIZER_FILES, "tokenizer from tokenizer.save_pretrained")
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file() or (path / "vocab.txt").is_file()):
        raise ExportFormatError(f"{path}: missing tokenizer.json (or tokenizer.model / vocab.txt)")
    config = _read_json(path / "config.json", "config.json")
    id2label = _id2label(path / "config.json", config)
    if manifest.task != "causal-lm":
        ordered = [id2label.get(i) for i in range(len(manifest.labels))]
        if ordered != manifest.labels:
            raise ExportFormatError(
                f"{path}: raylm.json labels {manifest.labels} differ from config.json id2label {id2label}; "
                "they must list the same labels in the same order"
            )
    tokenizer_config = _read_json(path / "tokenizer_config.json", "tokenizer_config.json")
    has_template = bool(tokenizer_config.get("chat_template")) or (path / "chat_template.jinja").is_file()
    return ModelExport(path=path, manifest=manifest, id2label=id2label, has_chat_template=has_template)


def read_adapter(directory: str | Path) -> AdapterExport:
    """Validate a LoRA adapter directory (peft files + raylm.json with adapter: true)."""
    path = Path(directory).expanduser().resolve()
    if not path.is_dir():
        raise ExportFormatError(f"{path}: adapter directory does not exist")
    _require_files(path, ADAPTER_FILES, "peft LoRA adapter saved with save_pretrained")
    _check_safetensors(path / "adapter_model.safetensors")
    raw = _read_json(path / "raylm.json", "raylm.json (the adapter manifest)")
    try:
        manifest = AdapterManifest.model_validate(raw)
    except ValidationError as exc:
        raise ExportFormatError(_validation_message(path / "raylm.json", exc)) from None
    return AdapterExport(name=path.name, path=path, manifest=manifest)


def list_adapters(adapters_dir: str | Path | None) -> list[str]:
    """Names of the complete adapter directories present now (a training run may add more at any time)."""
    if not adapters_dir:
        return []
    root = Path(adapters_dir).expanduser()
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and all((p / n).is_file() for n in (*ADAPTER_FILES, "raylm.json"))
    )
