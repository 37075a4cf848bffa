"""Sample an I2V clip from a trained checkpoint and a first frame.

    python launcher/sample.py --config runs/demo/config.yaml --checkpoint runs/demo/checkpoints/step-40 \
        --image first.png --prompt "a red square moving left" --out sample.gif --out sample.mp4
"""

import os

from i2v.cli import run
from i2v.config import parse_args
from i2v.errors import CheckpointError, ConfigError


def _flags(p):
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint directory (runs/X/checkpoints/step-N), or checkpoints/ to take its `latest`")
    p.add_argument("--image", required=True, help="first frame (PNG/JPEG); resized and centre-cropped to data.video")
    p.add_argument("--prompt", required=True, help="caption of the clip to generate")
    p.add_argument("--out", action="append", required=True, help=".mp4 or .gif path; repeat to write several")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default validation.num_inference_steps)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default validation.guidance_scale)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default run.seed)")
    p.add_argument("--frames", type=int, default=None, help="frames (default validation.num_frames or data.video.frames)")
    p.add_argument("--scheduler", choices=("ddim", "dpm"), default="ddim")
    p.add_argument("--fps", type=int, default=8)


def resolve_checkpoint(path: str) -> str:
    """A step directory as given, or the one a checkpoints/ directory's `latest` names."""
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            return os.path.join(path, f.read().strip())
    if not os.path.isdir(path):
        raise CheckpointError(f"--checkpoint: directory not found: {path}")
    return path


def load_image(path: str, height: int, width: int):
    """PNG/JPEG -> [3, H, W] in [-1, 1]: short-side resize then centre crop, as the clip loader does."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise ConfigError(f"--image: file not found: {path}")
    try:
        img = Image.open(path).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ConfigError(f"--image: cannot read {path} as an image: {e}") from None
    scale = max(height / img.height, width / img.width)
    size = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    img = img.resize(size, Image.BICUBIC)
    left, top = (img.width - width) // 2, (img.height - height) // 2
    img = img.crop((left, top, left + width, top + height))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def main():
    cfg, args = parse_args(description=__doc__.splitlines()[0], extra=_flags)
    for out in args.out:
        if os.path.splitext(out)[1].lower() not in (".mp4", ".gif"):
            raise ConfigError(f"--out: {out} must end in .mp4 or .gif")

    import torch

    from i2v.checkpoint import load_trained_transformer
    from i2v.data_prep.encoders import build_text_encoder, build_vae
    from i2v.sampling import PIPELINE_OFS, build_scheduler, sample_video, save_video

    v = cfg.validation
    steps = args.steps or v.num_inference_steps
    guidance = v.guidance_scale if args.guidance is None else args.guidance
    seed = cfg.run.seed if args.seed is None else args.seed
    frames = args.frames or v.num_frames or cfg.data.video.frames
    image = load_image(args.image, cfg.data.video.height, cfg.data.video.width)

    checkpoint = resolve_checkpoint(args.checkpoint)
    transformer = load_trained_transformer(cfg, checkpoint)
    vae = build_vae(cfg)
    text = build_text_encoder(cfg)
    prompt, negative = text([args.prompt, ""])
    print(f"sampling {frames} frames, {steps} {args.scheduler} steps, guidance {guidance}, seed {seed} "
          f"from {checkpoint}", flush=True)
    frames_out = sample_video(
        transformer, vae, build_scheduler(cfg.diffusion, args.scheduler), image, prompt, negative,
        num_frames=frames, num_inference_steps=steps, guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed), image_latents_mode=cfg.precompute.latents,
        ofs=cfg.diffusion.ofs if cfg.diffusion.ofs is not None else PIPELINE_OFS,
    )
    for out in args.out:
        save_video(frames_out, out, fps=args.fps)
        print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    run(main)
