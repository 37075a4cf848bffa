"""Reading what a committed checkpoint trained: its weights (live or EMA) and the encoders it
trained with. Sampling, evaluation and export start here."""

from __future__ import annotations

import os

import torch

from i2v.checkpoint.commit import resolve_committed, saved_client_state
from i2v.core.errors import CheckpointError, ConfigError
from i2v.data import lineage


def consolidated_state_dict(checkpoint_dir: str) -> dict:
    """fp32 weights of the model from a committed checkpoint (a step directory, or a checkpoints/ root for its
    `latest`; any ZeRO stage), on the CPU."""
    root, tag = os.path.split(resolve_committed(checkpoint_dir))
    files = os.listdir(os.path.join(root, tag))
    if any("optim_states" in f for f in files):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
    states = os.path.join(root, tag, "mp_rank_00_model_states.pt")
    if not os.path.isfile(states):
        raise CheckpointError(f"{os.path.join(root, tag)} holds no DeepSpeed model states")
    return {k: v.float() for k, v in torch.load(states, map_location="cpu", weights_only=True)["module"].items()}


def load_trained_transformer(cfg, checkpoint_dir: str, weights: str = "live"):
    """The trained DiT of a checkpoint, built from the run's config (LoRA adapters included), in eval mode.

    `weights`: "live" (DeepSpeed's fp32 consolidation of the trained weights) or "ema" (the stitched
    EMA over the trainable parameters). A LoRA checkpoint holds only the trainable parameters: the
    frozen base comes from `model.pretrained` / `model.arch`.
    """
    from i2v.model.adapters import lora_enabled, trainable_names, with_lora
    from i2v.model.ema import stitch
    from i2v.model.transformer import build_transformer

    checkpoint_dir = resolve_committed(checkpoint_dir)  # the weights and the EMA from the same step
    model = with_lora(build_transformer(cfg.model, seed=cfg.run.seed), cfg.model, seed=cfg.run.seed)
    state = consolidated_state_dict(checkpoint_dir)
    if weights == "ema":
        ema = stitch(checkpoint_dir)
        if ema is None:
            raise ConfigError(f"--weights ema: checkpoint {checkpoint_dir} holds no EMA (train.ema.decay was 0); "
                              "train with train.ema.decay > 0, or use --weights live")
        state.update(ema)
    expected = model.state_dict()
    required = trainable_names(model) if lora_enabled(cfg.model) else list(expected)
    missing = [k for k in required if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in state
             if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"checkpoint {checkpoint_dir} does not fit the model of the config ({cfg.model.pretrained or 'model.arch'}, "
            f"model.lora.rank {cfg.model.lora.rank}): missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"shape mismatches {wrong[:3]}"
        )
    model.load_state_dict(state, strict=False)
    return model.eval()


def adopt_checkpoint(cfg, checkpoint_dir: str) -> list[str]:
    """Give `cfg` the encoders a checkpoint trained with (see `adopt`): sampling, evaluation and
    export refuse any other. A checkpoint from before identities were recorded keeps the config's."""
    recorded = saved_client_state(checkpoint_dir).get("encoders") or {}
    return lineage.adopt(cfg, recorded, checkpoint_dir, "the checkpoint's latents") if recorded else []
