"""Learning-rate schedule and AdamW parameter groups, shared by DeepSpeed runs and references."""

from __future__ import annotations

import math

from training.config import OptimSection


def lr_multiplier(step: int, optim: OptimSection) -> float:
    """Factor applied to `optim.lr` for the update that follows `step` completed updates.

    Linear warmup from lr/warmup_steps to lr, then cosine (or linear) decay to
    `min_lr_ratio * lr` at `max_steps`; 'constant' holds lr after warmup.
    """
    if optim.warmup_steps and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    span = max(1, optim.max_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    if optim.schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * shape


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices and embeddings, not biases or norm scales (1-D tensors)."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def lambda_scheduler(optim: OptimSection):
    """A callable DeepSpeed accepts as `lr_scheduler`: optimizer -> LambdaLR over `lr_multiplier`."""
    from torch.optim.lr_scheduler import LambdaLR

    return lambda optimizer: LambdaLR(optimizer, lambda step: lr_multiplier(step, optim))
