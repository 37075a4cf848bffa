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
    OUT/i2v_export.json  provenance: checkpoint, step, weights (live | ema), LoRA, the conventions below

`--weights ema` writes the run's EMA (`train.ema`) instead of the live weights (the default). A
LoRA run (`model.lora`) writes OUT/transformer/ as the frozen base (with its `extra_trainable`
modules as trained) plus OUT/pytorch_lora_weights.safetensors, the adapters under the keys and
with the rank/alpha metadata of `CogVideoXImageToVideoPipeline.save_lora_weights`:

    pipe = CogVideoXImageToVideoPipeline.from_pretrained(OUT)
    pipe.load_lora_weights(OUT)

`--merge-lora` writes the merged transformer instead, and no LoRA file.

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
  concatenated to the noisy latents along channels; `i2v.core.diffusion.model_input` builds exactly the
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

from i2v.checkpoint.commit import saved_client_state
from i2v.checkpoint.reader import load_trained_transformer
from i2v.config import Config, to_dict
from i2v.core.errors import CheckpointError, ConfigError

# Config keys that decide what the exported pipeline computes; a checkpoint trained with other
# values must not be exported under this config.
MODEL_KEYS = ("model.pretrained", "model.arch", "model.arch_file", "model.lora.rank", "model.lora.alpha",
              "model.lora.target_modules", "model.lora.extra_trainable")
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name `load_lora_weights(OUT)` looks for
SCHEDULE_KEYS = tuple(f"diffusion.{k}" for k in (
    "num_train_timesteps", "beta_start", "beta_end", "snr_shift_scale", "rescale_zero_terminal_snr", "prediction",
    "ofs"))
ENCODER_KEYS = ("precompute.vae.pretrained", "precompute.vae.arch", "precompute.text_encoder.pretrained",
                "precompute.text_encoder.arch", "precompute.text_encoder.max_length")



def _dotted(tree: dict, key: str):
    for part in key.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else None
    return tree


def _norm(value):
    return os.path.normpath(value) if isinstance(value, str) else value


def trained_config(checkpoint_dir: str) -> tuple[dict | None, int]:
    """(config, step) the trainer recorded in the checkpoint's client state (None, -1 when absent)."""
    state = saved_client_state(checkpoint_dir)
    return state.get("config"), int(state.get("step", -1))


def check_config(cfg: Config, recorded: dict | None, checkpoint_dir: str, encoders_recorded: bool = False) -> None:
    """Refuse to export under a config whose model, schedule or encoders differ from the run's.

    With `encoders_recorded` the checkpoint's encoder identities were already adopted (i2v.data.lineage,
    which compares contents, so a moved model directory is still the same); older checkpoints are
    compared key by key."""
    if recorded is None:
        return
    keys = list(MODEL_KEYS + SCHEDULE_KEYS + (() if encoders_recorded else ENCODER_KEYS))
    if not encoders_recorded and (cfg.precompute.vae.arch or cfg.precompute.text_encoder.arch):
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


def load_transformer(cfg: Config, checkpoint_dir: str, weights: str = "live", merge_lora: bool = False):
    """(DiT in `model.dtype`, diffusers-format LoRA state dict or None) of a checkpoint.

    A LoRA run gives the base transformer (with its `extra_trainable` modules as trained) and the
    adapters apart, or with `merge_lora` the adapters merged into the base weights (in fp32, then cast).
    """
    from i2v.model.adapters import diffusers_lora_state_dict, lora_enabled
    from i2v.model.transformer import DTYPES

    model = load_trained_transformer(cfg, checkpoint_dir, weights)
    lora = None
    if lora_enabled(cfg.model):
        if merge_lora:
            model = model.float()
            model.fuse_lora()  # diffusers' own merge: base += B @ A * alpha / rank
        else:
            lora = diffusers_lora_state_dict(model)
        model.unload_lora()  # back to the plain diffusers module tree (merged weights, or the bare base)
    dtype = DTYPES[cfg.model.dtype]
    return (model if dtype == torch.float32 else model.to(dtype)).eval(), lora


def build_pipeline(cfg: Config, transformer):
    """A `CogVideoXImageToVideoPipeline` from the trained DiT and the run's VAE, T5 and schedule."""
    from diffusers import CogVideoXImageToVideoPipeline

    from i2v.sample.setup import build_parts

    parts = build_parts(cfg, "ddim")  # the pieces i2v's own sampler uses
    return CogVideoXImageToVideoPipeline(
        tokenizer=parts.text.tokenizer, text_encoder=parts.text.model, vae=parts.vae, transformer=transformer,
        scheduler=parts.scheduler,
    )


def pipeline_call(cfg: Config) -> dict:
    """The pipeline arguments that make diffusers sample as i2v does: the trained geometry and prompt length
    (diffusers pads prompts to 226 tokens unless told), the run's validation steps and guidance."""
    v = cfg.validation
    return {"height": cfg.data.video.height, "width": cfg.data.video.width,
            "num_frames": v.num_frames or cfg.data.video.frames,
            "max_sequence_length": cfg.precompute.text_encoder.max_length,
            "num_inference_steps": v.num_inference_steps, "guidance_scale": v.guidance_scale}


def usage_lines(cfg: Config, out: str, lora: bool) -> list[str]:
    """The diffusers lines that reproduce `launcher/sample.py` (same seed, same frames)."""
    call = pipeline_call(cfg)
    args = ", ".join(f"{k}={v}" for k, v in call.items())
    lines = ["import torch",
             "from diffusers import CogVideoXImageToVideoPipeline",
             "from diffusers.utils import export_to_video, load_image",
             "",
             f'pipe = CogVideoXImageToVideoPipeline.from_pretrained("{out}")']
    if lora:
        lines.append(f'pipe.load_lora_weights("{out}")')
    lines += [f'image = load_image("first_frame.png")  # {call["width"]}x{call["height"]}, as i2v crops it',
              f'video = pipe(image=image, prompt="...", {args},',
              "             use_dynamic_cfg=False, generator=torch.Generator().manual_seed(0)).frames[0]",
              f'export_to_video(video, "clip.mp4", fps={int(cfg.data.video.fps or 8)})']
    return lines


def export_readme(cfg: Config, checkpoint: str, step: int, weights: str, lora: bool, out: str) -> str:
    call = pipeline_call(cfg)
    sample = (f"python launcher/sample.py --config {os.path.join(cfg.run.output_dir, 'config.yaml')} "
              f"--checkpoint {checkpoint} --image first_frame.png --prompt \"...\" --seed 0 "
              f"--steps {call['num_inference_steps']} --guidance {call['guidance_scale']} "
              f"--frames {call['num_frames']} --weights {weights} --out clip.mp4")
    return "\n".join([
        "# An i2v export", "",
        f"Run `{cfg.run.output_dir}`, checkpoint `{checkpoint}` (step {step}), {weights} weights"
        f"{', LoRA adapters in ' + LORA_FILE if lora else ''}. Provenance and conventions: `i2v_export.json`.", "",
        "## Sampling it with diffusers", "",
        "These lines draw the frames that i2v's own sampler draws for the same first frame, prompt and seed:", "",
        "```python", *usage_lines(cfg, out, lora), "```", "",
        f"- `max_sequence_length={call['max_sequence_length']}`: the prompt length the model was trained on; "
        "the pipeline's default, 226, feeds it padding it never saw.",
        f"- `height`, `width`, `num_frames`: the trained geometry. The pipeline resizes the image to "
        f"{call['width']}x{call['height']} without cropping: give it a frame of that size (i2v's sampler "
        "resizes the short side and centre-crops).",
        "- The pipeline encodes the first frame with a sample of the VAE posterior, as i2v's sampler does.", "",
        "The same clip from the checkpoint with i2v:", "", "```bash", sample, "```", ""])


def write_lora_weights(directory: str, lora: dict, cfg: Config) -> str:
    """`pytorch_lora_weights.safetensors` as `save_lora_weights` writes it: keys, format and rank/alpha metadata."""
    from safetensors.torch import save_file

    from i2v.model.adapters import diffusers_lora_metadata

    path = os.path.join(directory, LORA_FILE)
    save_file(lora, path, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(
        diffusers_lora_metadata(cfg.model), indent=2, sort_keys=True)})
    return path


def export_pipeline(cfg: Config, checkpoint_dir: str, out_dir: str, weights: str = "live",
                    merge_lora: bool = False) -> str:
    """Write the diffusers directory for `checkpoint_dir` to `out_dir` atomically; returns its path.

    `weights`: "live" (the trained weights) or "ema" (the run's EMA; an error naming train.ema
    when it kept none). A LoRA run writes the base pipeline plus `pytorch_lora_weights.safetensors`,
    or with `merge_lora` the merged transformer and no LoRA file.
    """
    if merge_lora and not cfg.model.lora.rank:
        raise ConfigError("--merge-lora: the run has no LoRA adapters (model.lora.rank is 0)")
    from i2v.sample.setup import open_checkpoint

    # A committed checkpoint only, and the VAE and T5 it trained with, or an error naming both.
    ckpt, adopted = open_checkpoint(cfg, checkpoint_dir)
    recorded, step = trained_config(ckpt)
    check_config(cfg, recorded, ckpt, encoders_recorded=bool(adopted))
    out = os.path.abspath(out_dir.rstrip("/"))
    if os.path.exists(out) and not os.path.isfile(os.path.join(out, "model_index.json")):
        raise CheckpointError(f"--out: {out} exists and is not an exported pipeline; refusing to replace it")
    tmp, old = f"{out}.tmp", f"{out}.old"
    for stale in (tmp, old):  # left by an interrupted export
        shutil.rmtree(stale, ignore_errors=True)
    os.makedirs(os.path.dirname(out), exist_ok=True)

    transformer, lora = load_transformer(cfg, ckpt, weights, merge_lora)
    pipe = build_pipeline(cfg, transformer)
    pipe.save_pretrained(tmp, safe_serialization=True)
    if lora is not None:
        write_lora_weights(tmp, lora, cfg)
    vae = pipe.vae.config
    info = {
        "checkpoint": ckpt, "step": step, "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "weights": weights,
        "lora": None if not cfg.model.lora.rank else {"rank": cfg.model.lora.rank, "merged": merge_lora,
                                                      "file": None if merge_lora else LORA_FILE},
        "transformer_dtype": cfg.model.dtype,
        "vae_scaling_factor": float(vae.scaling_factor),
        "image_latents": "vae.encode(image) / scaling_factor" if vae.invert_scale_latents
        else "vae.encode(image) * scaling_factor",
        "ofs": cfg.diffusion.ofs,
        "config": to_dict(cfg),
    }
    with open(os.path.join(tmp, "i2v_export.json"), "w") as f:
        json.dump(info, f, indent=1)
    with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write(export_readme(cfg, ckpt, step, weights, lora is not None, out))
    if os.path.exists(out):
        os.rename(out, old)
    os.rename(tmp, out)  # the commit
    shutil.rmtree(old, ignore_errors=True)
    return out
