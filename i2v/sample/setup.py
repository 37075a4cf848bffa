"""The one set-up of a sampler: from a config (and a committed checkpoint) to the pieces it samples with.

Every way of sampling starts here, so each draws with the same pieces made the same way:
`launcher/sample.py` (`i2v.sample.sampling.sample_from_checkpoint`), the evaluation
(`i2v.sample.evaluation.RunSampler`), validation during training (`i2v.sample.validation.Validator`,
which brings the engine's own transformer) and the export (`i2v.sample.export`, which saves the
pieces as a diffusers pipeline).

- `open_checkpoint`: a committed checkpoint only (`i2v.checkpoint.commit.resolve_committed`), and the
  VAE and text encoder it trained with adopted into the config (`i2v.checkpoint.reader.adopt_checkpoint`);
- `build_parts`: the VAE, the text encoder, the diffusers scheduler with the training schedule and the
  `ofs` value, on one device;
- `load_sampler`: both, plus the trained transformer in eval mode;
- `first_frame`: an image or video file as the training loader makes a first frame (i2v.data.frames:
  resize to cover, centre crop), not the pipeline's stretch: the model learned from that crop. Validation
  still makes its first frames with the pipeline's own preprocessing (see i2v.sample.validation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

from i2v.config import Config, DiffusionConfig

# The I2V pipelines feed this ofs value to CogVideoX 1.5 models (those with an ofs embedding).
PIPELINE_OFS = 2.0


def build_scheduler(diffusion: DiffusionConfig, kind: str = "ddim"):
    """The diffusers scheduler with the training schedule (same alpha_bar as `i2v.core.diffusion`)."""
    cls = {"ddim": CogVideoXDDIMScheduler, "dpm": CogVideoXDPMScheduler}.get(kind)
    if cls is None:
        raise ValueError(f"scheduler kind must be 'ddim' or 'dpm', got {kind!r}")
    return cls(
        num_train_timesteps=diffusion.num_train_timesteps,
        beta_start=diffusion.beta_start,
        beta_end=diffusion.beta_end,
        beta_schedule="scaled_linear",
        snr_shift_scale=diffusion.snr_shift_scale,
        rescale_betas_zero_snr=diffusion.rescale_zero_terminal_snr,
        prediction_type="v_prediction" if diffusion.prediction == "v" else "epsilon",
        timestep_spacing="trailing",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
    )


def sampling_ofs(diffusion: DiffusionConfig) -> float:
    """The `ofs` a model with an ofs embedding is sampled with: `diffusion.ofs`, else the pipeline's."""
    return diffusion.ofs if diffusion.ofs is not None else PIPELINE_OFS


@dataclass
class SamplerParts:
    """What `i2v.sample.sampling.sample_videos` takes besides the images, prompts and noise."""

    transformer: torch.nn.Module | None  # the trained DiT in eval mode; None where the caller brings its own
    vae: torch.nn.Module
    text: object  # i2v.model.encoders.TextEncoder: prompts -> fp32 embeddings, the sampling dtype
    scheduler: object
    ofs: float
    checkpoint: str | None = None  # the committed directory the transformer came from


def first_frame(cfg: Config, path: str, what: str) -> torch.Tensor:
    """The first frame of an image or video file at the training size: float32 [3, H, W] in [-1, 1].
    `what` names the setting in errors (e.g. "--image", "validation.pairs[0].image")."""
    from i2v.data.frames import load_first_frame

    return load_first_frame(path, cfg.data.video.height, cfg.data.video.width, what)


def open_checkpoint(cfg: Config, checkpoint: str) -> tuple[str, list[str]]:
    """(committed directory, encoders adopted) for a step directory or a checkpoints/ root; a CheckpointError
    naming the path for anything uncommitted, a ConfigError when the config's encoders are not the trained ones."""
    from i2v.checkpoint.commit import resolve_committed
    from i2v.checkpoint.reader import adopt_checkpoint

    path = resolve_committed(checkpoint)
    return path, adopt_checkpoint(cfg, path)


def build_parts(cfg: Config, scheduler: str = "ddim", device: torch.device | None = None) -> SamplerParts:
    """The VAE, text encoder, scheduler and `ofs` of `cfg` (no transformer), on `device` (default: where built)."""
    from i2v.model.encoders import build_text_encoder, build_vae

    vae = build_vae(cfg)
    text = build_text_encoder(cfg)
    if device is not None:
        vae = vae.to(device)
        text.model.to(device)
    return SamplerParts(None, vae, text, build_scheduler(cfg.diffusion, scheduler), sampling_ofs(cfg.diffusion))


def load_sampler(cfg: Config, checkpoint: str, weights: str = "live", scheduler: str = "ddim") -> SamplerParts:
    """Everything to sample from a committed checkpoint: its trained DiT (`weights` "live" or "ema") in eval
    mode, and the VAE and text encoder it trained with."""
    from i2v.checkpoint.reader import load_trained_transformer

    path, _ = open_checkpoint(cfg, checkpoint)
    transformer = load_trained_transformer(cfg, path, weights)
    parts = build_parts(cfg, scheduler)
    parts.transformer, parts.checkpoint = transformer, path
    return parts
