"""Typed promote-if-better config (`kind: promote`): a fresh LoRA adapter replaces the served one only when
it scores at least as well on a fixed test file.

    kind: promote
    served: {base: /mnt/shared/exports/assistant, adapters_dir: /mnt/shared/adapters/assistant, adapter_name: assistant}
    candidate: {path: /mnt/shared/raylm-runs/assistant-refresh}     # a LoRA fine-tune run / checkpoint, or an adapter dir
    evaluation: {task: sft, files: [/mnt/shared/data/assistant-test.jsonl]}   # metric: the task's (perplexity)

The evaluation options are training.evaluate's (same names as its flags); the metric defaults to the task's
own and its direction (lower perplexity, higher F1) is fixed by the metric. Imports without torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from training.config import _Section

# Metrics training.evaluate reports for a causal-LM export (with or without an adapter), by evaluation task,
# each with the direction that is better. Classification of a causal LM is by label likelihood, zero-shot.
TASK_METRICS: dict[str, dict[str, Literal["min", "max"]]] = {
    "sft": {"perplexity": "min", "loss": "min"},
    "causal-lm": {"perplexity": "min", "loss": "min"},
    "classification": {"zero_shot_macro_f1": "max", "zero_shot_accuracy": "max"},
}
DEFAULT_METRIC = {"sft": "perplexity", "causal-lm": "perplexity", "classification": "zero_shot_macro_f1"}


class ServedSection(_Section):
    """What serving runs now: the base export and the adapters directory it reads `<adapter_name>` from."""

    base: str = Field(..., min_length=1, description="The causal-LM export serving loads (its app's export_dir).")
    adapters_dir: str = Field(..., min_length=1, description="The served adapters directory (the app's adapters_dir).")
    adapter_name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                              description="Served as model '<base model>:<adapter_name>'.")
    history_file: str = Field("promotions.jsonl", pattern=r"^[^/]+$",
                              description="Append-only JSON-lines record of every decision, inside adapters_dir.")


class CandidateSection(_Section):
    """The adapter to judge: a LoRA fine-tune run directory or checkpoint, or an adapter directory."""

    path: str = Field(..., min_length=1, description="Run dir / checkpoint of a kind: finetune LoRA run, or a "
                      "directory written by `training.export --adapter`.")
    which: Literal["auto", "best", "latest"] = Field("auto", description="Checkpoint of a run directory (auto = best).")


class PromoteEvaluationSection(_Section):
    """How both adapters are scored: training.evaluate on the same file(s), with the same options."""

    task: Literal["sft", "causal-lm", "classification"] = "sft"
    files: list[str] = Field(..., min_length=1, description="The fixed test file(s); every row must be usable.")
    metric: str | None = Field(None, description="Default: sft/causal-lm perplexity, classification zero_shot_macro_f1.")
    batch_size: int = Field(8, ge=1)
    max_len: int | None = Field(None, ge=8, description="Tokens per example; default: the export's max_seq_len.")
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:[0-9]+)?)$", description="Where the models run.")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    format: str = "auto"
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    response_field: str = "response"
    system_field: str | None = None
    text_field: str = "text"
    label_field: str = "label"
    prompt_template: str | None = Field(None, description="classification: with {text}; the label follows it.")
    labels: list[str] | None = Field(None, description="classification: the label set (default: the file's labels).")

    @model_validator(mode="after")
    def _check(self) -> "PromoteEvaluationSection":
        known = TASK_METRICS[self.task]
        if self.metric is None:
            self.metric = DEFAULT_METRIC[self.task]
        elif self.metric not in known:
            raise ValueError(f"evaluation.metric: {self.metric!r} is not a {self.task} metric of training.evaluate; "
                             f"use one of {', '.join(known)}")
        if self.dtype == "float16" and self.device == "cpu":
            raise ValueError("evaluation.dtype: float16 needs a GPU (evaluation.device: cuda). Use float32 or bfloat16")
        return self

    @property
    def mode(self) -> Literal["min", "max"]:
        """'min' when lower is better (perplexity, loss), 'max' when higher is (accuracy, F1)."""
        return TASK_METRICS[self.task][self.metric]

    def evaluate_argv(self) -> list[str]:
        """These options as training.evaluate's flags (the files, export, base and --out are added per model)."""
        argv = ["--task", self.task, "--batch-size", str(self.batch_size),
                "--device", self.device, "--dtype", self.dtype, "--format", self.format,
                "--messages-field", self.messages_field, "--prompt-field", self.prompt_field,
                "--response-field", self.response_field, "--text-field", self.text_field,
                "--label-field", self.label_field]
        optional = {"--max-len": self.max_len, "--system-field": self.system_field,
                    "--prompt-template": self.prompt_template,
                    "--labels": ",".join(self.labels) if self.labels else None}
        for flag, value in optional.items():
            if value is not None:
                argv += [flag, str(value)]
        return argv


class PromoteRunSection(_Section):
    name: str = Field("promote", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Names the run in logs and records.")


class PromoteConfig(_Section):
    """A whole promote step: stage the candidate, score both, publish the candidate if at least as good, record."""

    kind: Literal["promote"] = Field(..., description="Must be 'promote' (run with python -m training.promote).")
    served: ServedSection
    candidate: CandidateSection
    evaluation: PromoteEvaluationSection
    run: PromoteRunSection = PromoteRunSection()
