"""The one place that writes DeepSpeed's JSON, generated from the typed run config.

Learning rate, batch sizes, clipping and ZeRO settings are defined once in the YAML; nothing
else in raylm spells them out for DeepSpeed. Imports without torch or deepspeed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # either config kind: only its optim, deepspeed and scaling sections are read
    from training.config import PretrainConfig
    from training.finetune_config import FinetuneConfig


def build_deepspeed_config(cfg: "PretrainConfig | FinetuneConfig", world_size: int, grad_accum_steps: int | None = None,
                           load_universal: bool = False) -> dict[str, Any]:
    """DeepSpeed config dict for `deepspeed.initialize(config=...)`.

    `grad_accum_steps` overrides the config's when the world size changed and the global batch is
    kept (training.universal.accumulation_for); `load_universal` makes `engine.load_checkpoint`
    read a universal checkpoint (the copy training.universal converts for a different world size).
    The lr schedule is not in here: it is a torch LambdaLR built from `cfg.optim` by
    `training.schedule`, so the same function drives DeepSpeed and the plain-torch reference.
    """
    ds, optim = cfg.deepspeed, cfg.optim
    on_gpu = cfg.scaling.use_gpu

    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(
            contiguous_gradients=True,
            overlap_comm=on_gpu,
            reduce_scatter=True,
            reduce_bucket_size=ds.bucket_elements,
            allgather_bucket_size=ds.bucket_elements,
        )
    if ds.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=max(10_000, ds.bucket_elements // 10),
            stage3_param_persistence_threshold=10_000,
            # Export and checkpoints consolidate from the shards; no 16-bit copy is gathered on save.
            stage3_gather_16bit_weights_on_model_save=False,
        )
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}

    adamw_params: dict[str, Any] = {
        "lr": optim.lr,
        "betas": [optim.beta1, optim.beta2],
        "eps": optim.eps,
        "weight_decay": optim.weight_decay,
    }
    if not on_gpu and not ds.offload_optimizer:
        # On CPU without offload, torch's AdamW avoids compiling DeepSpeed's fused/CPU Adam ops.
        # With offload, DeepSpeed insists on its own (much faster) DeepSpeedCPUAdam.
        adamw_params["torch_adam"] = True

    gas = grad_accum_steps or optim.grad_accum_steps
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": optim.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "train_batch_size": optim.micro_batch_size * gas * world_size,
        "gradient_clipping": optim.grad_clip,
        "optimizer": {"type": "AdamW", "params": adamw_params},
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # raylm reports its own metrics
        "wall_clock_breakdown": False,
    }
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    if ds.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif ds.precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return config
