"""The optimizer and the learning-rate schedule the trainer hands to DeepSpeed, and the engine."""

from __future__ import annotations

import math

import torch

from i2v.config import Config


def lr_lambda(cfg: Config):
    """LR factor per optimizer step: linear warmup, then constant or cosine down to `min_lr_ratio`."""
    t = cfg.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    t = cfg.train
    return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)


def build_scheduler(cfg: Config):
    """A callable DeepSpeed applies to the optimizer it wraps (its own one under offload)."""
    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))


def build_engine(cfg: Config, model: torch.nn.Module, world_size: int, mpu=None):
    """The DeepSpeed engine of a run: its generated config, our AdamW over the trainable parameters
    (DeepSpeed's own CPU Adam under optimizer offload) and the LR schedule. Under sequence parallelism
    `world_size` is the data-parallel size and `mpu` the groups of `i2v.parallel`."""
    import deepspeed

    from i2v.adapters import trainable_parameters
    from i2v.ds_config import build_deepspeed_config, optimizer_in_config

    params = trainable_parameters(model)  # a frozen LoRA base never reaches the optimizer
    optimizer = None if optimizer_in_config(cfg) else build_optimizer(cfg, params)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=build_scheduler(cfg),
                                           model_parameters=params if optimizer is None else None,
                                           config=build_deepspeed_config(cfg, world_size), mpu=mpu)
    return engine
