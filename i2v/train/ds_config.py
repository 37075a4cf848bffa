"""The DeepSpeed config, generated from the run config so users never keep a second JSON in sync.

`deepspeed.extra` is merged in for advanced keys. It may not set what the tree already
controls (batch sizes, accumulation, clipping, ZeRO stage, precision, optimizer, scheduler),
and its top-level keys must be DeepSpeed's.
"""

from __future__ import annotations

import copy
import difflib

from i2v.config import Config, Resolved
from i2v.core.errors import ConfigError

# Top-level keys DeepSpeed understands that are safe to pass through.
PASSTHROUGH_KEYS = {
    "zero_optimization", "bf16", "fp16", "activation_checkpointing", "flops_profiler", "comms_logger",
    "wall_clock_breakdown", "communication_data_type", "prescale_gradients", "gradient_predivide_factor",
    "sparse_gradients", "steps_per_print", "dump_state", "memory_breakdown", "data_types", "checkpoint",
    "aio", "compile", "seq_parallel_communication_data_type", "zero_force_ds_cpu_optimizer",
    "zero_allow_untested_optimizer", "graph_harvesting", "use_data_before_expert_parallelism",
}
# Keys owned by the run config: dotted path -> the config key to set instead.
OWNED = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "gradient_clipping": "train.grad_clip",
    "optimizer": "train.lr / train.betas / train.weight_decay",
    "scheduler": "train.lr_schedule / train.warmup_steps",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "zero_optimization.offload_optimizer": "deepspeed.offload_optimizer",
    "bf16.enabled": "deepspeed.precision",
    "fp16.enabled": "deepspeed.precision",
}


def optimizer_in_config(cfg: Config) -> bool:
    """With optimizer offload DeepSpeed must build its own CPU Adam; otherwise we pass torch's AdamW."""
    return cfg.deepspeed.offload_optimizer


def build_deepspeed_config(cfg: Config, run: Resolved) -> dict:
    """DeepSpeed's config of `cfg` at the world size of `run` (`i2v.config.resolve`); its batch is over
    the data-parallel ranks, an SP group training one micro-batch."""
    t, d = cfg.train, cfg.deepspeed
    ds: dict = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": run.grad_accum_steps,
        "train_batch_size": run.global_batch_size,
        "zero_optimization": {"stage": d.zero_stage},
        "bf16": {"enabled": d.precision == "bf16"},
        "fp16": {"enabled": d.precision == "fp16", "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # the trainer does its own logging
        "wall_clock_breakdown": False,
    }
    if t.grad_clip > 0:
        ds["gradient_clipping"] = t.grad_clip
    if d.offload_optimizer:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": t.lr, "betas": list(t.betas), "eps": t.eps, "weight_decay": t.weight_decay},
        }
    _merge_extra(ds, d.extra)
    return ds


def _merge_extra(ds: dict, extra: dict) -> None:
    for key, value in extra.items():
        if key in OWNED:
            raise ConfigError(f"deepspeed.extra.{key}: set by the run config; use {OWNED[key]} instead")
        if key not in PASSTHROUGH_KEYS:
            close = difflib.get_close_matches(key, sorted(PASSTHROUGH_KEYS), n=1)
            hint = f" Did you mean 'deepspeed.extra.{close[0]}'?" if close else ""
            raise ConfigError(f"deepspeed.extra.{key}: not a DeepSpeed key this trainer passes through.{hint}")
        if isinstance(value, dict):
            for sub in value:
                dotted = f"{key}.{sub}"
                if dotted in OWNED:
                    raise ConfigError(f"deepspeed.extra.{dotted}: set by the run config; use {OWNED[dotted]} instead")
            ds[key] = {**ds.get(key, {}), **copy.deepcopy(value)}
        else:
            ds[key] = copy.deepcopy(value)
