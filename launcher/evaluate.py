"""Measure image-to-video on held-out synthetic pairs: first-frame fidelity and caption motion.

    python launcher/evaluate.py --config runs/demo/config.yaml --checkpoint runs/demo/checkpoints \
        [--pairs 16] [--ablation zero_image] [--ablation swap_caption]

Writes RUN/eval.json, RUN/eval.png (and eval-<ablation>.png) and the pictures to RUN/tensorboard;
see i2v/sample/evaluation.py for the metric and the report's fields.
"""

from i2v.core.cli import run
from i2v.config import parse_args


def _flags(p):
    from i2v.sample.evaluation import ABLATIONS

    p.add_argument("--checkpoint", required=True,
                   help="checkpoint directory (runs/X/checkpoints/step-N), or checkpoints/ to take its `latest`")
    p.add_argument("--pairs", type=int, default=16, help="held-out pairs to sample (default 16)")
    p.add_argument("--ablation", action="append", default=[], choices=ABLATIONS,
                   help="also evaluate with the image latents zeroed or each caption's direction swapped; repeatable")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default validation.num_inference_steps)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default validation.guidance_scale)")
    p.add_argument("--out", default=None, help="folder for eval.json and the pictures (default run.output_dir)")


def main():
    cfg, args = parse_args(description=__doc__.splitlines()[0], extra=_flags)

    from i2v.sample.evaluation import evaluate, headline
    from i2v.checkpoint.commit import resolve_committed

    report = evaluate(cfg, resolve_committed(args.checkpoint), pairs=args.pairs, ablations=tuple(args.ablation),
                      out_dir=args.out, steps=args.steps, guidance=args.guidance)
    out = args.out or cfg.run.output_dir
    print(f"evaluated {report['checkpoint']} in {report['seconds']:.0f} s -> {out}/eval.json", flush=True)
    print(headline(report), flush=True)
    print(f"picture: {out}/eval.png", flush=True)


if __name__ == "__main__":
    run(main)
