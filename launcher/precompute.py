"""Precompute latent shards: `python|torchrun|deepspeed launcher/precompute.py --config FILE [key=value ...]`.

Reads data.video_shards, writes data.latent_shards (one latents-N.tar per shard-N.tar, manifest.json,
rejects.jsonl, empty_prompt.safetensors). Resumable; ranks split the input shards by RANK / WORLD_SIZE.
The output folder is made only once the config is valid and the encoders are built, so a mistake leaves
none behind. An encoder named on the command line replaces the config file's, e.g.
`precompute.text_encoder.pretrained=models/CogVideoX-5b-I2V` drops an inline `precompute.text_encoder.arch`.
"""

from i2v.core.cli import run
from i2v.config import parse_args


def main():
    cfg, _ = parse_args(description=__doc__.splitlines()[0])

    from i2v.data_prep.precompute import rank_world, run as precompute, summary_lines

    rank, world = rank_world()
    for line in summary_lines(precompute(cfg, rank, world)):
        print(line, flush=True)


if __name__ == "__main__":
    run(main)
