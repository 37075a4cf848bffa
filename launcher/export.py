"""Export a checkpoint to a diffusers CogVideoXImageToVideoPipeline directory.

    python launcher/export.py --config RUN/config.yaml --checkpoint RUN/checkpoints/step-00000040 --out OUT \
        [--weights live|ema] [--merge-lora]

`--checkpoint` is a committed step directory or the checkpoints/ directory (its newest commit).
No process group is needed: ZeRO shards of any stage and rank count are consolidated offline.
`--weights` (default live) picks the trained weights or the run's EMA (train.ema). A LoRA run
writes the base pipeline plus pytorch_lora_weights.safetensors (`pipe.load_lora_weights(OUT)`),
or with `--merge-lora` the merged transformer.
"""

from i2v.core.cli import run
from i2v.config import parse_args


def _flags(parser):
    parser.add_argument("--checkpoint", required=True, help="checkpoint step directory or checkpoints/ root")
    parser.add_argument("--out", required=True, help="output directory (written to OUT.tmp, then renamed)")
    parser.add_argument("--weights", choices=("live", "ema"), default="live",
                        help="the trained weights (default) or the run's EMA (needs train.ema.decay > 0)")
    parser.add_argument("--merge-lora", action="store_true",
                        help="LoRA runs: merge the adapters into the transformer instead of writing the LoRA file")


def main():
    cfg, args = parse_args(description=__doc__, extra=_flags)

    from i2v.sample.export import export_pipeline, usage_lines

    out = export_pipeline(cfg, args.checkpoint, args.out, weights=args.weights, merge_lora=args.merge_lora)
    print(f"exported {args.checkpoint} ({args.weights} weights) to {out}", flush=True)
    print(f"sample it with diffusers as i2v does ({out}/README.md):\n", flush=True)
    lora = bool(cfg.model.lora.rank) and not args.merge_lora
    print("\n".join("    " + line if line else "" for line in usage_lines(cfg, out, lora)), flush=True)


if __name__ == "__main__":
    run(main)
