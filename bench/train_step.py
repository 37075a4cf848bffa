"""Trainer overhead: the trainer's step time against a bare loop of the same model.

    python bench/train_step.py [--config configs/tiny.yaml] [--steps 40] [--json] [key=value ...]

All sides train the same model (same seed) on the same latent batches with the same loss
function. The bare side is forward, backward, clip and AdamW with nothing else; the trainer
side is the real `Trainer` (DeepSpeed engine, NaN agreement, logging); a third side drives the
same DeepSpeed engine with a bare loop, which splits the ratio into DeepSpeed's share and the
trainer's own. It reports median step times after a warm-up and `ratio` = trainer / bare
(goal <= 1.15). Latent shards shaped for the config are generated in a temporary directory.
Results go to bench/results/train_step-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from i2v import diffusion
from i2v.config import load_config
from i2v.data.latents import LatentDataset, LatentShardWriter, make_loader, save_empty_prompt
from i2v.distributed import init_distributed
from i2v.model import build_transformer
from i2v.objective import training_loss
from i2v.optim import build_optimizer
from i2v.trainer import Trainer


def write_random_latents(directory: str, cfg, shards: int = 4, per_shard: int = 16) -> None:
    arch = build_transformer(cfg.model).config
    f = (cfg.data.video.frames - 1) // 4 + 1
    h, w = cfg.data.video.height // 8, cfg.data.video.width // 8
    g = torch.Generator().manual_seed(0)
    for s in range(shards):
        with LatentShardWriter(os.path.join(directory, f"latents-{s:06d}.tar")) as wr:
            for i in range(per_shard):
                video = torch.randn(f, arch.out_channels, h, w, generator=g)
                image = video[:1].unsqueeze(0).repeat(2, 1, 1, 1, 1)
                wr.write(f"s{s}-{i}", video, image, torch.randn(arch.max_text_seq_length, arch.text_embed_dim, generator=g))
    save_empty_prompt(directory, torch.zeros(arch.max_text_seq_length, arch.text_embed_dim))


def _optimizer_and_data(cfg, model):
    """What every bare loop shares with the trainer: the same AdamW, schedule and latent stream."""
    opt = build_optimizer(cfg, model.parameters())
    ds = LatentDataset(cfg.data.latent_shards, batch_size=cfg.train.micro_batch_size, seed=cfg.run.seed,
                       shuffle_buffer=cfg.data.shuffle_buffer, resampled=True)
    return opt, diffusion.alphas_cumprod(cfg.diffusion), iter(make_loader(ds, 0))


def bare_loop(cfg, steps: int, device) -> list[float]:
    model = build_transformer(cfg.model, seed=cfg.run.seed).to(device).train()
    opt, abar, data = _optimizer_and_data(cfg, model)
    times, cache = [], {}
    for step in range(steps):
        t0 = time.perf_counter()
        loss = training_loss(model, next(data), abar, cfg, cfg.run.seed, step, None, device, "torch", cache)
        loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def bare_engine_loop(cfg, steps: int, device, world_size: int) -> list[float]:
    """The same DeepSpeed engine and config as the trainer, driven by a bare loop (no trainer logic)."""
    import deepspeed

    from i2v.ds_config import build_deepspeed_config

    model = build_transformer(cfg.model, seed=cfg.run.seed)
    opt, abar, data = _optimizer_and_data(cfg, model)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=build_deepspeed_config(cfg, world_size))
    times, cache = [], {}
    for step in range(steps):
        t0 = time.perf_counter()
        loss = training_loss(engine, next(data), abar, cfg, cfg.run.seed, step, None, device, "torch", cache)
        engine.backward(loss)
        engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    env = init_distributed()
    with tempfile.TemporaryDirectory() as tmp:
        latents, out = os.path.join(tmp, "latents"), os.path.join(tmp, "run")
        os.makedirs(latents)
        base = load_config(args.config, args.overrides)
        overrides = [*args.overrides, f"data.latent_shards={latents}", f"run.output_dir={out}",
                     f"train.max_steps={args.steps}", "train.log_every=1", "checkpoint.every_steps=0",
                     "checkpoint.resume=false", "train.warmup_steps=0", "kernels.noise=torch", "data.num_workers=0"]
        cfg = load_config(args.config, overrides)
        write_random_latents(latents, base)

        Trainer(cfg, env).train()
        with open(os.path.join(out, "metrics.jsonl")) as f:
            trainer_times = [json.loads(line)["step_time_s"] for line in f]
        bare_times = bare_loop(cfg, args.steps, env.device)
        engine_times = bare_engine_loop(cfg, args.steps, env.device, env.world_size)

    trainer_s = statistics.median(trainer_times[args.warmup:])
    bare_s = statistics.median(bare_times[args.warmup:])
    engine_s = statistics.median(engine_times[args.warmup:])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu-{os.cpu_count()}cores"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "device": device, "torch": torch.__version__, "python": platform.python_version(), "commit": commit,
        "config": args.config, "overrides": args.overrides, "steps": args.steps, "warmup": args.warmup,
        "zero_stage": cfg.deepspeed.zero_stage, "micro_batch_size": cfg.train.micro_batch_size,
        "trainer_step_s": trainer_s, "bare_step_s": bare_s, "bare_engine_step_s": engine_s,
        "ratio": trainer_s / bare_s, "goal_ratio": 1.15,
        # How the ratio splits: DeepSpeed's engine against plain torch, then the trainer against that engine.
        "engine_vs_bare": engine_s / bare_s, "trainer_vs_engine": trainer_s / engine_s,
    }
    tag = "cpu" if device.startswith("cpu") else device.replace(" ", "-").lower()
    os.makedirs("bench/results", exist_ok=True)
    path = f"bench/results/train_step-{tag}.json"
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"trainer {trainer_s * 1e3:.1f} ms/step | bare loop {bare_s * 1e3:.1f} ms/step | "
          f"ratio {result['ratio']:.3f} (goal <= 1.15) | bare DeepSpeed-engine loop {engine_s * 1e3:.1f} ms/step: "
          f"engine/bare {result['engine_vs_bare']:.3f}, trainer/engine {result['trainer_vs_engine']:.3f} | saved {path}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
