"""Export a training checkpoint as a diffusers `CogVideoXImageToVideoPipeline` directory.

    launcher/export.py --config RUN_CONFIG --checkpoint RUN/checkpoints/step-00000040 --out OUT

The result loads with `CogVideoXImageToVideoPipeline.from_pretrained(OUT)`:

    OUT/transformer/     the trained DiT: DeepSpeed's fp32 consolidation of the ZeRO shards (any
                         stage, any number of ranks), saved in `model.dtype`
    OUT/vae/             the VAE the latents were made with (`precompute.vae`)
    OUT/text_encoder/    the T5 encoder (`precompute.text_encoder`) and OUT/tokenizer/
    OUT/scheduler/       CogVideoXDDIMScheduler with the run's schedule: scaled-linear betas,
                         `snr_shift_scale`, `rescale_betas_zero_snr`, v_prediction, trailing spacing
    OUT/model_index.json
    OUT/i2v_export.json  provenance: checkpoint, step, the conventions below

It is written to OUT.tmp and renamed into place, so OUT is either complete or absent (an older
OUT is replaced only after the new one is complete).

Latent conventions (tests/test_export.py checks each against the pipeline itself):

- Video latents: `vae.encode(video) * scaling_factor`; the pipeline decodes `latents / scaling_factor`.
- Image latents: the pipeline feeds `vae.encode(image) * scaling_factor` (CogVideoX 1.0, e.g. 5B-I2V)
  or `vae.encode(image) / scaling_factor` when the VAE config sets `invert_scale_latents`
  (CogVideoX 1.5, which was trained that way). The precompute job stores
  `vae.encode(frame0 + sigma * eps) * encoders.image_latent_scale(vae)`, the same factor, so with
  sigma = 0 and the same generator its image latent equals the pipeline's bit for bit.
- Layout: the one image latent frame is zero-padded over time to the video's latent length and
  concatenated to the noisy latents along channels; `i2v.diffusion.model_input` builds exactly the
  pipeline's transformer input (`cat([x_t, image_latents_padded], dim=2)`).
- CogVideoX 1.5 (`patch_size_t` set): when the latent length f is not a multiple of patch_size_t the
  pipeline samples f + pad latent frames, keeps the image latent at frame 0 followed by zeros (its
  "first-frame duplication" line selects `F % patch_size_t = 0` frames, i.e. nothing), and drops the
  first `pad` generated frames before decoding (`output_type="latent"` keeps them). Its transformer input is therefore
  `model_input(x_t, image_latent)` on the padded length: train 1.5 models on latent lengths that are
  multiples of patch_size_t (the extra front frame carries no image condition), with
  `diffusion.ofs: 2.0`, the value the pipeline feeds to models with an ofs embedding.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import torch

from i2v.checkpoint import MARKER, consolidated_state_dict
from i2v.config import Config, to_dict
from i2v.errors import CheckpointError, ConfigError

# Config keys that decide what the exported pipeline computes; a checkpoint trained with other
# values must not be exported under this config.
MODEL_KEYS = ("model.pretrained", "model.arch", "model.arch_file")
SCHEDULE_KEYS = tuple(f"diffusion.{k}" for k in (
    "num_train_timesteps", "beta_start", "beta_end", "snr_shift_scale", "rescale_zero_terminal_snr", "prediction",
    "ofs"))
ENCODER_KEYS = ("precompute.vae.pretrained", "precompute.vae.arch", "precompute.text_encoder.pretrained",
                "precompute.text_encoder.arch", "precompute.text_encoder.max_length")


def resolve_checkpoint(path: str) -> str:
    """A committed checkpoint directory from a tag directory or a checkpoints/ root (its `latest`)."""
    path = os.path.abspath(path.rstrip("/"))
    if not os.path.isdir(path):
        raise CheckpointError(f"--checkpoint: directory not found: {path}")
    latest = os.path.join(path, "latest")
    if not os.path.isfile(os.path.join(path, MARKER)) and os.path.isfile(latest):
        with open(latest) as f:
            path = os.path.join(path, f.read().strip())
    if not os.path.isfile(os.path.join(path, MARKER)):
        raise CheckpointError(
            f"--checkpoint: {path} is not a committed checkpoint (no {MARKER}); pass a step-NNNNNNNN directory "
            "under run.output_dir/checkpoints, or that checkpoints/ directory itself"
        )
    return path


def _dotted(tree: dict, key: str):
    for part in key.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else None
    return tree


def _norm(value):
    return os.path.normpath(value) if isinstance(value, str) else value


def trained_config(checkpoint_dir: str) -> tuple[dict | None, int]:
    """(config, step) the trainer recorded in the checkpoint's client state (None, -1 when absent)."""
    # ZeRO-3 names rank 0's model-states file differently; either carries the client state.
    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    found = [os.path.join(checkpoint_dir, n) for n in names if os.path.isfile(os.path.join(checkpoint_dir, n))]
    if not found:
        raise CheckpointError(f"checkpoint {checkpoint_dir} holds no DeepSpeed model states ({' or '.join(names)})")
    states = found[0]
    try:
        state = torch.load(states, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise CheckpointError(f"checkpoint {checkpoint_dir}: cannot read {states}: {e}") from None
    return state.get("config"), int(state.get("step", -1))


def check_config(cfg: Config, recorded: dict | None, checkpoint_dir: str) -> None:
    """Refuse to export under a config whose model, schedule or encoders differ from the run's."""
    if recorded is None:
        return
    keys = list(MODEL_KEYS + SCHEDULE_KEYS + ENCODER_KEYS)
    if cfg.precompute.vae.arch or cfg.precompute.text_encoder.arch:
        keys.append("run.seed")  # inline encoders are random-init from the run's seed
    mine = to_dict(cfg)
    diffs = [(k, _dotted(recorded, k), _dotted(mine, k)) for k in keys
             if _norm(_dotted(recorded, k)) != _norm(_dotted(mine, k))]
    if diffs:
        lines = "; ".join(f"{k}: checkpoint has {a!r}, config has {b!r}" for k, a, b in diffs)
        raise ConfigError(
            f"--config does not match the run that wrote {checkpoint_dir}: {lines}. Export with the run's own "
            "config (run.output_dir/config.yaml)"
        )


def load_transformer(cfg: Config, checkpoint_dir: str):
    """The DiT of `cfg.model` with the checkpoint's consolidated fp32 weights, in `model.dtype`."""
    from i2v.model import DTYPES, build_transformer

    state = consolidated_state_dict(checkpoint_dir)
    model = build_transformer(cfg.model, seed=cfg.run.seed)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"checkpoint {checkpoint_dir} does not fit the model of --config ({cfg.model.pretrained or 'model.arch'}): "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}, shape mismatches {wrong[:3]}"
        )
    model.load_state_dict(state, strict=True)
    dtype = DTYPES[cfg.model.dtype]
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def build_pipeline(cfg: Config, transformer):
    """A `CogVideoXImageToVideoPipeline` from the trained DiT and the run's VAE, T5 and schedule."""
    from diffusers import CogVideoXImageToVideoPipeline

    from i2v.data_prep.encoders import build_text_encoder, build_vae
    from i2v.sampling import build_scheduler

    text = build_text_encoder(cfg)
    return CogVideoXImageToVideoPipeline(
        tokenizer=text.tokenizer, text_encoder=text.model, vae=build_vae(cfg), transformer=transformer,
        scheduler=build_scheduler(cfg.diffusion, "ddim"),
    )


def export_pipeline(cfg: Config, checkpoint_dir: str, out_dir: str) -> str:
    """Write the diffusers directory for `checkpoint_dir` to `out_dir` atomically; returns its path."""
    ckpt = resolve_checkpoint(checkpoint_dir)
    recorded, step = trained_config(ckpt)
    check_config(cfg, recorded, ckpt)
    out = os.path.abspath(out_dir.rstrip("/"))
    if os.path.exists(out) and not os.path.isfile(os.path.join(out, "model_index.json")):
        raise CheckpointError(f"--out: {out} exists and is not an exported pipeline; refusing to replace it")
    tmp, old = f"{out}.tmp", f"{out}.old"
    for stale in (tmp, old):  # left by an interrupted export
        shutil.rmtree(stale, ignore_errors=True)
    os.makedirs(os.path.dirname(out), exist_ok=True)

    pipe = build_pipeline(cfg, load_transformer(cfg, ckpt))
    pipe.save_pretrained(tmp, safe_serialization=True)
    vae = pipe.vae.config
    info = {
        "checkpoint": ckpt, "step": step, "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "transformer_dtype": cfg.model.dtype,
        "vae_scaling_factor": float(vae.scaling_factor),
        "image_latents": "vae.encode(image) / scaling_factor" if vae.invert_scale_latents
        else "vae.encode(image) * scaling_factor",
        "ofs": cfg.diffusion.ofs,
        "config": to_dict(cfg),
    }
    with open(os.path.join(tmp, "i2v_export.json"), "w") as f:
        json.dump(info, f, indent=1)
    if os.path.exists(out):
        os.rename(out, old)
    os.rename(tmp, out)  # the commit
    shutil.rmtree(old, ignore_errors=True)
    return out
