"""Export a checkpoint to a diffusers CogVideoXImageToVideoPipeline directory.

    python launcher/export.py --config RUN/config.yaml --checkpoint RUN/checkpoints/step-00000040 --out OUT

`--checkpoint` is a committed step directory or the checkpoints/ directory (its newest commit).
No process group is needed: ZeRO shards of any stage and rank count are consolidated offline.
"""

from i2v.cli import run
from i2v.config import parse_args


def _flags(parser):
    parser.add_argument("--checkpoint", required=True, help="checkpoint step directory or checkpoints/ root")
    parser.add_argument("--out", required=True, help="output directory (written to OUT.tmp, then renamed)")


def main():
    cfg, args = parse_args(description=__doc__, extra=_flags)

    from i2v.export import export_pipeline

    out = export_pipeline(cfg, args.checkpoint, args.out)
    print(f"exported {args.checkpoint} to {out}", flush=True)


if __name__ == "__main__":
    run(main)
