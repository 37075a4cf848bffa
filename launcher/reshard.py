"""Convert a committed ZeRO checkpoint to DeepSpeed's universal form, offline, for a resume at another world size.

    python launcher/reshard.py --checkpoint RUN/checkpoints/step-00000040 [--workers 4]

Writes RUN/checkpoints/universal/step-00000040/ (under a tmp- name, committed with its own
COMMITTED.json, then renamed). The trainer does the same on rank 0 when it resumes a ZeRO-1/2/3
checkpoint at another world size, and uses a conversion made here if it verifies: run it ahead
for large models, whose conversion would outlast the other ranks' wait in a collective.
`--checkpoint` is a committed step directory or the checkpoints/ directory (its newest commit).
"""

import argparse
import os

from i2v.core.cli import run
from i2v.core.errors import CheckpointError


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint step directory or checkpoints/ root")
    parser.add_argument("--workers", type=int, default=1, help="processes extracting and merging shards (default 1)")
    args = parser.parse_args()

    from i2v.checkpoint.commit import resolve_committed
    from i2v.checkpoint.reshard import convert

    if not os.path.isdir(args.checkpoint):
        raise CheckpointError(f"--checkpoint: not a checkpoint directory: {os.path.abspath(args.checkpoint)}")
    root, tag = os.path.split(resolve_committed(args.checkpoint))  # committed checkpoints only
    out = convert(root, tag, workers=args.workers, log=lambda m: print(m, flush=True))
    print(f"universal checkpoint: {out}", flush=True)


if __name__ == "__main__":
    run(main)
