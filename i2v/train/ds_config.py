"""The DeepSpeed config, generated from the run config so users never keep a second JSON in sync.

`deepspeed.extra` is merged in for advanced keys. It may not set what the tree already
controls (batch sizes, accumulation, clipping, ZeRO stage, precision, optimizer, scheduler),
and its top-level keys must be DeepSpeed's: `Config.validate` checks that when the config is
loaded (`i2v.config.schema.OWNED`, `PASSTHROUGH_KEYS`).
"""

from __future__ import annotations

import copy

from i2v.config import Config, Resolved


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
        # check_grad_overflow: a bf16 ZeRO-1/2 step with a non-finite gradient norm is skipped, as fp32's
        # is (the NaN guard relies on it, i2v.train.nan_guard); fp32's check costs no read more.
        "bf16": {"enabled": d.precision == "bf16", **({"check_grad_overflow": True} if d.precision == "bf16" else {})},
        "fp16": {"enabled": d.precision == "fp16", "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # the trainer does its own logging
        "wall_clock_breakdown": False,
        # Its start and stop synchronize the device every micro-batch (i2v.train.host_syncs); the
        # trainer measures throughput itself. `deepspeed.extra.timers` turns it back on.
        "timers": {"throughput": {"enabled": False}},
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
        if isinstance(value, dict):
            ds[key] = {**ds.get(key, {}), **copy.deepcopy(value)}
        else:
            ds[key] = copy.deepcopy(value)
