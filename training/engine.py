"""The one DeepSpeed engine builder: used by the training loop and by the benchmarks.

Everything DeepSpeed is told comes from the typed run config (pretrain or finetune kind):
`training.deepspeed_config` for the JSON, `training.schedule` for the lr schedule and AdamW groups.
"""

from __future__ import annotations

import sys

from training.deepspeed_config import build_deepspeed_config
from training.schedule import lambda_scheduler, param_groups


def import_deepspeed():
    """`import deepspeed`, without the optional `import mlflow` of DeepSpeed's autotuner.

    deepspeed's config module imports its autotuner, which imports mlflow when it is installed (raylm's
    `mlflow` and `test` extras install it) only to log autotuning experiments; raylm never runs DeepSpeed's
    autotuner. That import is ~1.3 of the ~1.6 CPU-s `import deepspeed` costs in every Train worker
    (measured with mlflow-skinny 3.17 on the 2-core CPU machines). mlflow stays importable afterwards; a
    process that already imported mlflow keeps it as it is.
    """
    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        import deepspeed

        return deepspeed
    sys.modules["mlflow"] = None  # `import mlflow` raises ImportError: the autotuner records has_mlflow=False
    try:
        import deepspeed
    finally:
        del sys.modules["mlflow"]
    return deepspeed


def build_engine(model, cfg, world_size: int, ds_config: dict | None = None, grad_accum_steps: int | None = None,
                 load_universal: bool = False):
    """Wrap `model` in a DeepSpeed engine for `world_size` ranks; returns the engine.

    Only parameters with requires_grad reach the optimizer (frozen bases of LoRA/prompt tuning
    hold no optimizer state). `ds_config` overrides the JSON built from `cfg` (benchmarks that
    measure a variant pass their own). `grad_accum_steps` and `load_universal` come from the resume
    plan when a checkpoint of another world size is resumed (training.universal).
    """
    deepspeed = import_deepspeed()
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.optim.weight_decay),
        config=ds_config if ds_config is not None else build_deepspeed_config(
            cfg, world_size, grad_accum_steps=grad_accum_steps, load_universal=load_universal),
        lr_scheduler=lambda_scheduler(cfg.optim),
    )
    return engine
