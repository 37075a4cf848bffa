"""Pack videos + captions into WebDataset video shards (video2dataset layout).

    python launcher/make_shards.py --input videos/ --output shards/ --samples-per-shard 1000 --workers 8

A rerun over the same inputs keeps the shards it finished before and says so.
"""

import argparse
import sys

from i2v.data_prep.make_shards import make_shards
from i2v.core.errors import I2VError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="folder of videos with sidecar .txt captions, or a .csv/.jsonl of path,caption")
    p.add_argument("--output", required=True, help="folder for shard-NNNNNN.tar, manifest.json and rejects.jsonl")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="inputs per shard (default 1000)")
    p.add_argument("--workers", type=int, default=1, help="parallel probe processes (default 1)")
    p.add_argument("--min-frames", type=int, default=1, help="reject videos with fewer decoded frames (default 1)")
    p.add_argument("--allow-empty-captions", action="store_true",
                   help="keep clips whose caption is empty or whitespace, stored as \"\" so that precompute encodes "
                        "them as the empty prompt (unconditional clips); by default they are rejected as 'empty caption'")
    args = p.parse_args(argv)
    try:
        m = make_shards(args.input, args.output, args.samples_per_shard, args.workers, args.min_frames,
                        allow_empty_captions=args.allow_empty_captions)
    except I2VError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    kept, written = m["kept"], m["written"]
    print(f"kept {kept['shards']} finished shard(s) ({kept['samples']} samples), "
          f"wrote {written['shards']} shard(s) ({written['samples']} samples)")
    print(f"{m['samples']} samples in {len(m['shards'])} shard(s), {m['rejected']} rejected "
          f"(see rejects.jsonl), {m['total_frames']} frames, {m['total_hours']:.4f} h -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
