"""Sample an I2V clip from a trained checkpoint and a first frame.

    python launcher/sample.py --config runs/demo/config.yaml --checkpoint runs/demo/checkpoints/step-40 \
        --image first.png --prompt "a red square moving left" --out sample.gif --out sample.mp4
"""

import os

from i2v.core.cli import run
from i2v.config import parse_args
from i2v.core.errors import ConfigError


def _flags(p):
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint directory (runs/X/checkpoints/step-N), or checkpoints/ to take its `latest`")
    p.add_argument("--image", required=True, help="first frame: an image (PNG, JPEG, ...) or a video (mp4, webm, ...: its first frame); "
                        "resized and centre-cropped to data.video as the training clips were")
    p.add_argument("--prompt", required=True, help="caption of the clip to generate")
    p.add_argument("--out", action="append", required=True, help=".mp4 or .gif path; repeat to write several")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default validation.num_inference_steps)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default validation.guidance_scale)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default run.seed)")
    p.add_argument("--frames", type=int, default=None, help="frames (default validation.num_frames or data.video.frames)")
    p.add_argument("--scheduler", choices=("ddim", "dpm"), default="ddim")
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--weights", choices=("live", "ema"), default="live",
                   help="the trained weights (default) or the run's EMA (needs train.ema.decay > 0)")


def main():
    cfg, args = parse_args(description=__doc__.splitlines()[0], extra=_flags)
    for out in args.out:
        if os.path.splitext(out)[1].lower() not in (".mp4", ".gif"):
            raise ConfigError(f"--out: {out} must end in .mp4 or .gif")

    from i2v.checkpoint.commit import resolve_committed
    from i2v.sample.sampling import sample_from_checkpoint, save_video
    from i2v.sample.setup import first_frame

    v = cfg.validation
    steps = args.steps or v.num_inference_steps
    guidance = v.guidance_scale if args.guidance is None else args.guidance
    seed = cfg.run.seed if args.seed is None else args.seed
    frames = args.frames or v.num_frames or cfg.data.video.frames
    image = first_frame(cfg, args.image, "--image")
    checkpoint = resolve_committed(args.checkpoint)  # committed checkpoints only
    print(f"sampling {frames} frames, {steps} {args.scheduler} steps, guidance {guidance}, seed {seed}, "
          f"{args.weights} weights from {checkpoint}", flush=True)
    frames_out = sample_from_checkpoint(cfg, checkpoint, image, args.prompt, num_frames=frames,
                                        num_inference_steps=steps, guidance_scale=guidance, seed=seed,
                                        scheduler=args.scheduler, weights=args.weights)
    for out in args.out:
        save_video(frames_out, out, fps=args.fps)
        print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    run(main)
