"""The optimizer and the learning-rate schedule the trainer hands to DeepSpeed, and the engine."""

from __future__ import annotations

import math

import torch

from i2v.config import Config, Resolved


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


def _decays(name: str, owner: torch.nn.Module) -> bool:
    """Weight decay pulls weights toward 0: right for matrices, wrong for biases and norm gains."""
    return not (name.endswith("bias") or "Norm" in type(owner).__name__)


def param_groups(cfg: Config, model: torch.nn.Module) -> list[dict]:
    """The trainable parameters as AdamW groups: [decay, no decay] with `train.no_decay`, else one group.

    Both groups exist whenever `train.no_decay` is on (an empty one is dropped), whatever the decay
    value: a resume that changes `train.weight_decay` still finds the optimizer state it saved.
    """
    t = cfg.train
    if not t.no_decay:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": t.weight_decay}]
    decay, no_decay, seen = [], [], set()
    for owner in model.modules():
        for name, p in owner.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:  # a tied parameter belongs to one group
                seen.add(id(p))
                (decay if _decays(name, owner) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def fused_adamw(device) -> bool:
    """Whether the AdamW over the fp32 master weights is torch's fused one: on CUDA, where one kernel
    updates every tensor of a group and the step counters stay on the device (the for-each AdamW reads
    each group's counter on the host, a sync per group and step). Elsewhere the default AdamW, which
    the CPU resume tests pin bit for bit."""
    return torch.device(device).type == "cuda"


def build_optimizer(cfg: Config, groups: list[dict], device="cpu") -> torch.optim.Optimizer:
    """Torch's AdamW over `groups`, fused when the master weights live on `device` = CUDA (`fused_adamw`)."""
    t = cfg.train
    extra = {"fused": True} if fused_adamw(device) else {}
    return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay, **extra)


def optimizer_name(optimizer) -> str:
    """What updates the weights, for logs and benchmarks: "torch.AdamW(fused)", "torch.AdamW(foreach)",
    "torch.AdamW" (the per-tensor loop) or the class of another one (DeepSpeed's CPU Adam under offload).
    `optimizer` may be a DeepSpeed engine, its ZeRO wrapper or the optimizer itself."""
    for _ in range(4):  # engine -> ZeRO wrapper -> the optimizer it steps
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or not isinstance(inner, torch.optim.Optimizer) and not hasattr(inner, "optimizer"):
            break
        optimizer = inner
    if isinstance(optimizer, torch.optim.AdamW):
        if optimizer.defaults.get("fused"):
            return "torch.AdamW(fused)"
        return "torch.AdamW(foreach)" if optimizer.defaults.get("foreach") else "torch.AdamW"
    return f"{type(optimizer).__module__.split('.')[0]}.{type(optimizer).__name__}"


def build_lr_schedule(cfg: Config):
    """A callable DeepSpeed applies to the optimizer it wraps (its own one under offload)."""
    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))


def build_engine(cfg: Config, model: torch.nn.Module, run: Resolved, mpu=None):
    """The DeepSpeed engine of a run: its generated config, our AdamW over the trainable parameters
    (fused on CUDA; DeepSpeed's own CPU Adam under optimizer offload) and the LR schedule. `run` is `cfg` resolved at
    the world size; under sequence parallelism `mpu` holds the groups of `i2v.model.parallel`."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from i2v.train.ds_config import build_deepspeed_config, optimizer_in_config

    groups = param_groups(cfg, model)  # trainable only: a frozen LoRA base never reaches the optimizer
    # Where DeepSpeed puts the module, and so the master weights (the model is still on the host here).
    device = torch.device(get_accelerator().current_device_name())
    optimizer = None if optimizer_in_config(cfg) else build_optimizer(cfg, groups, device)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=build_lr_schedule(cfg),
                                           model_parameters=groups if optimizer is None else None,
                                           config=build_deepspeed_config(cfg, run), mpu=mpu)
    return engine
