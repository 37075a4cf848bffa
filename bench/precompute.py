"""Precompute job throughput against a bare loop of the same encoder forwards.

The job (`data_prep.precompute.run`: shard reading, video decode, VAE video + K first-frame
encodes, T5, safetensors + tar writing, checksums) is timed end to end on synthetic clips; the
bare loop runs only the VAE and T5 forwards on the same clips, already decoded in memory, with the
same batch size. Goal: job / bare >= 0.9. Each side is timed `--repeats` times, interleaved, and the
best time is kept (the CPU is shared).

    python bench/precompute.py [--clips 32 --per-shard 8 --repeats 3 --out bench/results/precompute-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from i2v.config import load_config  # noqa: E402
from i2v.data.videos import iter_shard_clips  # noqa: E402
from i2v import encoders  # noqa: E402
from i2v.data_prep.make_shards import make_shards  # noqa: E402
from i2v.data_prep.precompute import batches, run  # noqa: E402
from i2v.data.synthetic import make_clips  # noqa: E402


def bare_loop(cfg, clips: list[dict]) -> float:
    """Seconds for the encoder forwards alone: VAE on each clip, VAE on K first frames, T5 on captions."""
    vae = encoders.build_vae(cfg)
    text = encoders.build_text_encoder(cfg)
    k = cfg.precompute.image_draws
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches(iter(clips), cfg.precompute.batch_size):
            video = torch.stack([c["video"] for c in batch]).permute(0, 2, 1, 3, 4).contiguous()
            encoders.vae_posterior(vae, video)
            first = torch.stack([c["image"] for c in batch for _ in range(k)])[:, :, None]
            encoders.vae_posterior(vae, first)
            text([c["caption"] for c in batch])
    return time.perf_counter() - start


def job(cfg) -> float:
    shutil.rmtree(cfg.data.latent_shards, ignore_errors=True)
    start = time.perf_counter()
    run(cfg, progress=False)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(REPO, "configs", "tiny.yaml"))
    p.add_argument("--clips", type=int, default=32)
    p.add_argument("--per-shard", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "precompute-cpu.json"))
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. precompute.batch_size=2")
    a = p.parse_args(argv)

    load_before = os.getloadavg()[0]
    work = tempfile.mkdtemp(prefix="bench-precompute-")
    try:
        make_clips(os.path.join(work, "clips"), a.clips, seed=0)
        make_shards(os.path.join(work, "clips"), os.path.join(work, "shards"), a.per_shard, 1, 1, progress=False)
        cfg = load_config(a.config, [f"data.video_shards={work}/shards", f"data.latent_shards={work}/latents",
                                     *a.overrides])
        shards = sorted(os.path.join(work, "shards", n) for n in os.listdir(os.path.join(work, "shards"))
                        if n.endswith(".tar"))
        clips = [c for s in shards for c in iter_shard_clips(s, cfg.data.video)]
        bare_loop(cfg, clips[: cfg.precompute.batch_size])  # warm-up: first-call allocations
        bare_s, job_s = [], []
        for _ in range(a.repeats):
            bare_s.append(bare_loop(cfg, clips))
            job_s.append(job(cfg))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n = len(clips)
    result = {
        "clips": n,
        "per_shard": a.per_shard,
        "batch_size": cfg.precompute.batch_size,
        "image_draws": cfg.precompute.image_draws,
        "geometry": [cfg.data.video.frames, cfg.data.video.height, cfg.data.video.width],
        "job_clips_per_s": round(n / min(job_s), 3),
        "bare_clips_per_s": round(n / min(bare_s), 3),
        "ratio": round(min(bare_s) / min(job_s), 3),
        "goal_ratio": 0.9,
        "job_seconds": [round(t, 3) for t in job_s],
        "bare_seconds": [round(t, 3) for t in bare_s],
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after: shared CPU
        "torch": torch.__version__,
        "machine": platform.platform(),
        "overrides": a.overrides,
    }
    print(f"precompute: job {result['job_clips_per_s']} clips/s, bare VAE+T5 loop {result['bare_clips_per_s']} "
          f"clips/s, ratio {result['ratio']} (goal >= 0.9) on {n} clips")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"saved {a.out}")
    return result


if __name__ == "__main__":
    main()
