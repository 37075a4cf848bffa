"""Precompute latent shards: `python|torchrun|deepspeed launcher/precompute.py --config FILE [key=value ...]`.

Reads data.video_shards, writes data.latent_shards (one latents-N.tar per shard-N.tar, manifest.json,
rejects.jsonl, empty_prompt.safetensors). Resumable; ranks split the input shards by RANK / WORLD_SIZE.
"""

from i2v.cli import run
from i2v.config import parse_args


def main():
    cfg, _ = parse_args(description=__doc__.splitlines()[0])

    from i2v.data_prep.precompute import rank_world, run as precompute

    rank, world = rank_world()
    s = precompute(cfg, rank, world)
    print(f"[rank {rank}/{world}] {s['written']} shard(s) written ({s['samples']} clips, {s['rejected']} rejected), "
          f"{s['skipped']} already finished -> {s['output']}", flush=True)
    m = s["manifest"]
    if m is not None:
        empty = f", {len(m['empty_shards'])} empty shard(s)" if m["empty_shards"] else ""
        print(f"dataset complete: {m['samples']} clips in {len(m['shards'])} shard(s), {m['rejected']} rejected"
              f"{empty}; see {s['output']}/manifest.json and rejects.jsonl", flush=True)


if __name__ == "__main__":
    run(main)
