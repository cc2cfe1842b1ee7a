"""Typed run configuration: one YAML per run, validated before any worker is requested.

This module must import without torch, ray or transformers: the driver, `cluster.preflight`
and the tests validate configs on machines (and in processes) that never load a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from training.config_io import (  # noqa: F401  (re-exported: callers read, override and validate through training.config)
    ConfigError,
    apply_overrides,
    format_validation_error,
    read_yaml,
    redact_credentials,
    resolve_data_path,
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ModelSection(_Section):
    """Which network to train: built from the fields below, or loaded from a local directory."""

    source: Literal["scratch", "hf_dir", "gguf"] = Field(
        "scratch",
        description="scratch: a Llama-style model built from the fields below; hf_dir: a local "
        "Hugging Face directory; gguf: a local GGUF file (dequantized on load).",
    )
    path: str | None = Field(None, description="Local HF directory, or the GGUF file, for hf_dir/gguf.")
    hidden_size: int = Field(64, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int | None = Field(None, gt=0, description="Grouped-query attention; default = num_heads.")
    intermediate_size: int | None = Field(None, gt=0, description="MLP width; default = 8/3 * hidden, rounded to 64.")
    max_position_embeddings: int = Field(2048, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    tie_word_embeddings: bool = True
    gradient_checkpointing: bool = False
    trust_remote_code: bool = Field(False, description="Run model code shipped in a checkpoint directory. Off by default.")

    @model_validator(mode="after")
    def _check(self) -> "ModelSection":
        problems = []
        if self.source != "scratch" and not self.path:
            problems.append(f"model.path: required when model.source is '{self.source}'; set it to a local path")
        if self.source == "scratch" and self.hidden_size % self.num_heads:
            problems.append(
                f"model.hidden_size: {self.hidden_size} is not divisible by model.num_heads={self.num_heads}; "
                "pick a hidden_size that is a multiple of num_heads"
            )
        kv = self.num_kv_heads or self.num_heads
        if self.source == "scratch" and self.num_heads % kv:
            problems.append(
                f"model.num_kv_heads: {kv} does not divide model.num_heads={self.num_heads}; use a divisor of num_heads"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def resolved_intermediate_size(self) -> int:
        if self.intermediate_size:
            return self.intermediate_size
        return max(64, int(round(self.hidden_size * 8 / 3 / 64)) * 64)


class TokenizerSection(_Section):
    """Where token ids come from: an existing tokenizer directory, or a byte-level BPE trained on the corpus."""

    path: str | None = Field(
        None,
        description="Existing tokenizer directory. Unset: use the model's own tokenizer for hf_dir/gguf, "
        "or train a byte-level BPE on the training files for scratch.",
    )
    vocab_size: int = Field(4096, ge=300, le=1_000_000, description="Size of a trained byte-level BPE (>= 256 bytes + specials).")
    min_frequency: int = Field(2, ge=1)


class DataSection(_Section):
    """Raw text in, packed fixed-length token blocks (Parquet) out."""

    train_files: list[str] = Field(
        ...,
        min_length=1,
        description="Text files or globs (.txt one document per line, .jsonl, .parquet). "
        "'pkg://package/relative/path' names a file shipped inside an installed Python package.",
    )
    format: Literal["auto", "txt", "jsonl", "parquet"] = "auto"
    text_field: str = Field("text", min_length=1, description="Column/key holding the text in jsonl and parquet files.")
    seq_len: int = Field(128, ge=8, description="Tokens per packed training block.")
    val_fraction: float = Field(0.05, ge=0.0, lt=0.5, description="Share of documents held out for validation.")
    max_documents: int | None = Field(None, gt=0, description="Use only the first N documents (smoke runs).")
    prepared_dir: str | None = Field(
        None, description="Where tokenizer and packed Parquet go. Default: <run.storage_path>/<run.name>/data."
    )


class OptimSection(_Section):
    """AdamW with linear warmup then cosine (or linear/constant) decay."""

    lr: float = Field(3e-4, gt=0, le=1.0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Final lr as a fraction of lr.")
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.1, ge=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0.0, description="Global grad-norm clip; 0 turns clipping off.")
    micro_batch_size: int = Field(8, ge=1, description="Blocks per worker per forward pass.")
    grad_accum_steps: int = Field(1, ge=1)
    max_steps: int = Field(100, ge=1, description="Optimizer steps in the whole run.")

    @model_validator(mode="after")
    def _check(self) -> "OptimSection":
        if self.warmup_steps >= self.max_steps and self.max_steps > 1:
            raise ValueError(
                f"optim.warmup_steps: {self.warmup_steps} must be smaller than optim.max_steps={self.max_steps}; "
                "lower warmup_steps or raise max_steps"
            )
        return self


class DeepSpeedSection(_Section):
    """ZeRO stage, offload and precision; `training.deepspeed_config` turns these into DeepSpeed's JSON."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = Field(False, description="Optimizer states and step on CPU (ZeRO-Offload); stage >= 1.")
    offload_params: bool = Field(False, description="Parameters on CPU between uses (ZeRO-Infinity); stage 3 only.")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    bucket_elements: int = Field(
        50_000_000, ge=10_000,
        description="ZeRO reduce/all-gather bucket size in elements. The default suits GPUs and large models; a "
        "bucket bigger than the model holds every gradient until the end of backward (benchmarks/zero_memory), "
        "so lower it for small models or tight memory.",
    )

    @model_validator(mode="after")
    def _check(self) -> "DeepSpeedSection":
        problems = []
        if self.offload_optimizer and self.zero_stage == 0:
            problems.append("deepspeed.offload_optimizer: needs ZeRO; set deepspeed.zero_stage to 1, 2 or 3, or turn offload off")
        if self.offload_params and self.zero_stage != 3:
            problems.append(
                f"deepspeed.offload_params: only ZeRO stage 3 partitions parameters (zero_stage is {self.zero_stage}); "
                "set deepspeed.zero_stage: 3 or offload_params: false"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


class ScalingSection(_Section):
    """How many Ray Train workers, and what each one reserves."""

    num_workers: int | tuple[int, int] = Field(
        2,
        description="Ray Train workers; [min, max] for an elastic run that starts with what the cluster has, "
        "shrinks when a node is lost and grows back when capacity returns, each time resuming the last "
        "checkpoint at the new worker count (training.universal).",
    )
    elastic_resize_monitor_interval_s: float = Field(
        60.0, ge=0, description="Elastic runs: how often a healthy run checks whether more workers fit (then restarts with them)."
    )
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = Field(
        None, description="Ray resources per worker, e.g. {CPU: 4, GPU: 1}. Default: {CPU: 1} (+ {GPU: 1} with use_gpu)."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    @field_validator("num_workers", mode="before")
    @classmethod
    def _count_or_range(cls, value):
        is_int = isinstance(value, int) and not isinstance(value, bool)
        is_pair = isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value)
        if not (is_int or is_pair):
            raise ValueError(f"scaling.num_workers: {value!r} must be a count (2) or an elastic range [min, max] ([1, 2])")
        return value

    @model_validator(mode="after")
    def _check(self) -> "ScalingSection":
        res = self.resources_per_worker or {}
        problems = [
            f"scaling.resources_per_worker.{k}: {v} must be >= 0" for k, v in res.items() if v < 0
        ]
        if self.min_workers < 1 or self.min_workers > self.max_workers:
            problems.append(
                f"scaling.num_workers: {list(self.num_workers) if self.is_elastic else self.num_workers}: worker counts "
                "must be greater than or equal to 1, and an elastic range [min, max] needs min <= max, e.g. 2 or [1, 2]"
            )
        if res.get("GPU", 0) > 0 and not self.use_gpu:
            problems.append("scaling.resources_per_worker.GPU: GPUs reserved while scaling.use_gpu is false; set use_gpu: true")
        if self.use_gpu and "GPU" in res and res["GPU"] == 0:
            problems.append("scaling.resources_per_worker.GPU: 0 while use_gpu is true; set GPU: 1 or use_gpu: false")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def is_elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if self.is_elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if self.is_elastic else self.num_workers

    @property
    def worker_resources(self) -> dict[str, float]:
        res = dict(self.resources_per_worker or {"CPU": 1.0})
        if self.use_gpu:
            res.setdefault("GPU", 1.0)
        return res


class RunSection(_Section):
    """Where results go, how often to checkpoint and evaluate, and what to do when a worker dies."""

    name: str = Field("pretrain", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    storage_path: str = Field("./runs", description="Local or shared directory (all nodes must see it on a multi-node run).")
    seed: int = 0
    checkpoint_every_steps: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(1, ge=-1, description="Worker-group restarts from the last checkpoint; -1 = unlimited.")
    eval_every_steps: int = Field(50, ge=1)
    eval_batches: int = Field(8, ge=1, description="Validation batches per worker per evaluation.")
    log_every_steps: int = Field(
        10, ge=1,
        description="Report metrics every N steps. Ray Train's controller takes one report per health-check "
        "interval (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s): reporting more often than that stalls the workers.",
    )
    resume: bool = Field(True, description="Continue from the run's latest checkpoint when one exists.")
    mlflow_tracking_uri: str | None = Field(None, description="e.g. file:./runs/mlruns; needs the 'mlflow' extra.")

    @model_validator(mode="after")
    def _check(self) -> "RunSection":
        if "://" in self.storage_path:
            raise ValueError(
                f"run.storage_path: {self.storage_path!r} is a URI; raylm writes prepared data, metrics and "
                "checkpoints through the filesystem, so mount the bucket (s3fs, gcsfuse) or use NFS/EFS/Filestore "
                "and give that mount's path"
            )
        return self


class RunConfigBase(_Section):
    """What every run kind shares: where the run lives and how its YAML is written back."""

    @property
    def run_dir(self) -> Path:
        return Path(self.run.storage_path).expanduser().resolve() / self.run.name

    @property
    def data_dir(self) -> Path:
        if self.data.prepared_dir:
            return Path(self.data.prepared_dir).expanduser().resolve()
        return self.run_dir / "data"

    def redacted_dump(self) -> dict:
        """The config as plain data with credentials in URIs replaced by '***' (for logs, trackers, files)."""
        return redact_credentials(self.model_dump(mode="json"))

    def to_yaml(self) -> str:
        """The resolved config written beside checkpoints and exports; never carries credentials."""
        return yaml.safe_dump(self.redacted_dump(), sort_keys=False, allow_unicode=True)


class PretrainConfig(RunConfigBase):
    """A whole pretraining run."""

    kind: Literal["pretrain"] = Field("pretrain", description="Config kind; optional for pretraining YAMLs.")
    model: ModelSection = ModelSection()
    tokenizer: TokenizerSection = TokenizerSection()
    data: DataSection
    optim: OptimSection = OptimSection()
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    scaling: ScalingSection = ScalingSection()
    run: RunSection = RunSection()

    @model_validator(mode="after")
    def _check(self) -> "PretrainConfig":
        problems = []
        if self.model.source == "scratch" and self.data.seq_len > self.model.max_position_embeddings:
            problems.append(
                f"data.seq_len: {self.data.seq_len} exceeds model.max_position_embeddings="
                f"{self.model.max_position_embeddings}; shorten seq_len or raise max_position_embeddings"
            )
        if self.deepspeed.precision != "fp32" and not self.scaling.use_gpu:
            # bf16 runs on CPUs too, but fp16 needs a loss scaler that DeepSpeed only supports on accelerators.
            if self.deepspeed.precision == "fp16":
                problems.append("deepspeed.precision: fp16 needs GPUs (scaling.use_gpu: true); use fp32 or bf16 on CPU")
        if self.scaling.is_elastic:
            # The global batch is fixed at max workers; every smaller world size must reach it by accumulation.
            per_worker = self.global_batch_blocks // self.optim.micro_batch_size
            odd = [w for w in range(self.scaling.min_workers, self.scaling.max_workers + 1) if per_worker % w]
            if odd:
                sizes = range(self.scaling.min_workers, self.scaling.max_workers + 1)
                fit = next(g for g in range(1, 10**6) if all(g * self.scaling.max_workers % w == 0 for w in sizes))
                problems.append(
                    f"scaling.num_workers: an elastic run keeps the global batch of {self.scaling.max_workers} workers "
                    f"x {self.optim.grad_accum_steps} accumulation step(s), which {odd} worker(s) cannot reach by "
                    f"accumulation: set optim.grad_accum_steps to a multiple of {fit}, or narrow scaling.num_workers"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def global_batch_blocks(self) -> int:
        """Blocks per optimizer step; elastic runs keep the one of their largest size at any size."""
        return self.optim.micro_batch_size * self.optim.grad_accum_steps * self.scaling.max_workers


# --------------------------------------------------------------------------------------------
# Config kinds


# Config kinds: the top-level `kind` key picks the typed class (absent = pretrain, so older YAMLs stay valid).
# Each kind names the command that runs it, for the "wrong command" message.
KIND_COMMANDS = {"pretrain": "python -m training.pretrain", "finetune": "python -m training.finetune",
                 "prune": "python -m training.prune", "promote": "python -m training.promote"}


def config_class_for(raw: dict, source: str = "config") -> type[BaseModel]:
    """The typed config class for a raw YAML dict, picked by its `kind` key (default: pretrain)."""
    kind = raw.get("kind", "pretrain")
    if kind == "pretrain":
        return PretrainConfig
    if kind == "finetune":
        from training.finetune_config import FinetuneConfig  # sibling module; imports this one

        return FinetuneConfig
    if kind == "prune":
        from training.prune_config import PruneConfig  # sibling module; imports this one

        return PruneConfig
    if kind == "promote":
        from training.promote_config import PromoteConfig  # sibling module; imports this one

        return PromoteConfig
    raise ConfigError([f"kind: unknown config kind {kind!r}; use one of {', '.join(KIND_COMMANDS)}"], source)


def load_config_of_kind(path: str | Path, overrides: list[str] | None, expected: str):
    """Load a run YAML that must be of kind `expected`; another kind is refused in one line naming its command."""
    raw = apply_overrides(read_yaml(path), overrides)
    kind = raw.get("kind", "pretrain")
    if kind != expected and kind in KIND_COMMANDS:
        raise ConfigError([
            f"kind: {path} is a {kind} config, not a {expected} config; run it with "
            f"`{KIND_COMMANDS[kind]} --config {path}`"
        ], str(path))
    return validate_config(raw, config_class_for(raw, str(path)), str(path))


def validate_config(raw: dict, model_cls: type[BaseModel] | None = None, source: str = "config"):
    """Validate a raw dict (class picked by `kind` unless given); raise ConfigError listing every problem."""
    model_cls = model_cls or config_class_for(raw, source)
    try:
        return model_cls.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, model_cls), source) from None


def load_config(path: str | Path, overrides: list[str] | None = None, model_cls: type[BaseModel] | None = None):
    """Read, override and validate a run YAML; the class is picked by its `kind` unless given."""
    raw = apply_overrides(read_yaml(path), overrides)
    return validate_config(raw, model_cls, str(path))


def load_any_config(path: str | Path, overrides: list[str] | None = None):
    """Read and validate a run YAML of any kind (PretrainConfig, FinetuneConfig, ...)."""
    return load_config(path, overrides)
