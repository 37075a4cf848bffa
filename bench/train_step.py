"""Training-step benchmarks.

Trainer overhead (the default; CPU):

    python bench/train_step.py [--config configs/tiny.yaml] [--steps 40] [--json] [key=value ...]

All sides train the same model (same seed) on the same latent batches with the same loss
function. The bare side is forward, backward, clip and AdamW with nothing else; the trainer
side is the real `Trainer` (DeepSpeed engine, NaN agreement, logging); a third side drives the
same DeepSpeed engine with a bare loop, which splits the ratio into DeepSpeed's share and the
trainer's own. It reports median step times after a warm-up and `ratio` = trainer / bare
(goal <= 1.15). Latent shards shaped for the config are generated in a temporary directory.
Results go to bench/results/train_step-<device>.json.

The real shape (GPU):

    python bench/train_step.py --shape 5b [--layers K] [--steps 8] [--variants LIST] [--peak-tflops T]

The CogVideoX-5b-I2V architecture (configs/arch/cogvideox-5b-i2v.json, random init, `--layers`
blocks of its 42) at 49 x 480 x 720 clips (13 x 60 x 90 latents, 17,776 tokens), bf16, one
micro-batch per step. Each variant trains a fresh model on the same random latent shards:
  - stock: what a diffusers example user runs: diffusers' model with its SDPA processor (SDPA's
    default backend) in fp32 under bf16 autocast, diffusers' gradient checkpointing of every block
    (the example's --gradient_checkpointing), the eager noise chain, torch AdamW, gradient clipping;
  - stock-compile: the same with each transformer block through torch.compile;
  - i2v-all: the real `Trainer` of configs/cogvideox-5b-i2v.yaml (DeepSpeed ZeRO-2 bf16, fused noise
    kernel, i2v's attention) with `model.gradient_checkpointing: all`;
  - i2v-auto: the same with `auto` (the planner's choice for this device's memory);
  - i2v-compile: i2v-auto with `model.compile: blocks` (each block through torch.compile, in place);
  - i2v-fp8-rowwise, i2v-fp8-tensorwise: i2v-compile with `model.fp8.compute` (float8 matmuls in the
    blocks' projections and feed-forward layers, their casts fused by the compile; needs torchao).
Each variant runs --steps timed steps (the median after --warmup), then 2 more under torch.profiler:
the 15 costliest CUDA kernels with their share of the step, the time the device sat idle waiting
for the host, and the attention op that actually ran (bench/_profile.py states the rules). It
records the checkpointing setting, the optimizer, torch.compile on or off, s/step, TFLOP/s, MFU
(model FLOPs) and HFU (with the recompute), and peak memory (allocated and reserved); `speedups`
compare the i2v variants with both stock ones (goals: auto >= 1.3x stock, >= 1.1x stock-compile,
MFU >= 40%), and the planner's peak estimate is set against i2v-all's torch.cuda.max_memory_allocated.
FLOPs come from i2v.model.flops; MFU is against --peak-tflops or the device's dense bf16 peak.
Writes bench/results/train_step-5b-<gpu>.json. Without CUDA it runs the same code on the tiny
config (fp32) as a smoke test and writes train_step-5b-cpu-smoke.json ("mode": "cpu-smoke").
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from i2v.core import diffusion
from i2v.config import load_config, resolve
from i2v.data.latents import LatentDataset, LatentShardWriter, make_loader, save_empty_prompt
from i2v.core.distributed import init_distributed
from i2v.model.flops import default_peak_tflops, training_flops
from i2v.model.transformer import build_transformer, predict, read_arch_file, rotary_embeddings, transformer_arch
from i2v.train.objective import Objective
from i2v.train.optim import build_optimizer, optimizer_name
from i2v.model.checkpointing import effective
from i2v.config.schema import latent_shape
from i2v.plan.planner import checkpointing_at_start, make_plan
from i2v.train.trainer import Trainer

from _kernels import REPO, git_commit, write_result  # noqa: E402  (bench/ is the script's directory)
from noise import stock_chain  # noqa: E402
from _profile import print_table, profile_steps  # noqa: E402


def write_random_latents(directory: str, cfg, shards: int = 4, per_shard: int = 16) -> None:
    arch = transformer_arch(cfg.model)
    f, h, w = latent_shape(cfg)
    text = (arch["max_text_seq_length"], arch["text_embed_dim"])
    g = torch.Generator().manual_seed(0)
    for s in range(shards):
        with LatentShardWriter(os.path.join(directory, f"latents-{s:06d}.tar")) as wr:
            for i in range(per_shard):
                video = torch.randn(f, arch["out_channels"], h, w, generator=g)
                image = video[:1].unsqueeze(0).repeat(2, 1, 1, 1, 1)
                wr.write(f"s{s}-{i}", video, image, torch.randn(*text, generator=g))
    save_empty_prompt(directory, torch.zeros(*text))


def _optimizer_and_data(cfg, model):
    """What every bare loop shares with the trainer: the same AdamW, schedule and latent stream."""
    opt = build_optimizer(cfg, model.parameters())
    ds = LatentDataset(cfg.data.latent_shards, batch_size=cfg.train.micro_batch_size, seed=cfg.run.seed,
                       shuffle_buffer=cfg.data.shuffle_buffer, resampled=True)
    return opt, diffusion.alphas_cumprod(cfg.diffusion), iter(make_loader(ds, 0))


def bare_loop(cfg, steps: int, device) -> list[float]:
    model = build_transformer(cfg.model, seed=cfg.run.seed).to(device).train()
    opt, _, data = _optimizer_and_data(cfg, model)
    objective, times = Objective(cfg, device), []
    for step in range(steps):
        t0 = time.perf_counter()
        loss = objective.loss(model, next(data), step)
        _backward_and_step(loss, model, opt, cfg, device)
        times.append(time.perf_counter() - t0)
    return times


def _backward_and_step(loss, model, opt, cfg, device) -> None:
    """A plain loop's backward, gradient clipping and AdamW step, finished on the device."""
    loss.backward()
    if cfg.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_engine_loop(cfg, steps: int, device, world_size: int) -> list[float]:
    """The same DeepSpeed engine and config as the trainer, driven by a bare loop (no trainer logic)."""
    import deepspeed

    from i2v.train.ds_config import build_deepspeed_config

    model = build_transformer(cfg.model, seed=cfg.run.seed)
    opt, _, data = _optimizer_and_data(cfg, model)
    ds_config = build_deepspeed_config(cfg, resolve(cfg, world_size))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    objective, times = Objective(cfg, device), []
    for step in range(steps):
        t0 = time.perf_counter()
        loss = objective.loss(engine, next(data), step)
        engine.backward(loss)
        engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


ARCH_5B = REPO / "configs" / "arch" / "cogvideox-5b-i2v.json"
VARIANTS = ("stock", "stock-compile", "i2v-all", "i2v-auto", "i2v-compile", "i2v-fp8-rowwise", "i2v-fp8-tensorwise")
DEFAULT_VARIANTS = VARIANTS[:5]  # the float8 ones are asked for by name (bench/gpu.sh runs them apart)
PROFILED_STEPS = 2  # recorded by the profiler after the timed steps


def shape_config(smoke: bool, layers: int, steps: int, latents: str, out: str, checkpointing: str = "all",
                 compile_setting: str = "none", fp8: str = "none"):
    """configs/cogvideox-5b-i2v.yaml on a random-init `layers`-block 5B, set up for timing (tiny.yaml for a smoke run)."""
    base = REPO / "configs" / ("tiny.yaml" if smoke else "cogvideox-5b-i2v.yaml")
    cfg = load_config(base, [
        f"model.gradient_checkpointing={checkpointing}", f"model.compile={compile_setting}", f"model.fp8.compute={fp8}",
        f"data.latent_shards={latents}", f"run.output_dir={out}",
        f"train.max_steps={steps}", "train.log_every=1", "train.warmup_steps=0", "train.micro_batch_size=1",
        "train.grad_accum_steps=1", "checkpoint.resume=false", "checkpoint.save_at_end=false",
        "validation.every_steps=0", "data.num_workers=0"])
    if not smoke:  # set in the tree, not through a YAML override, so that values such as 1e-05 stay floats
        cfg.model.pretrained = cfg.model.arch_file = None
        cfg.model.arch = {**read_arch_file(str(ARCH_5B), "--shape 5b"), "num_layers": layers}
    return cfg


def stock_loop(cfg, steps: int, device, after_step=None, compile_blocks: bool = False) -> tuple[list[float], dict]:
    """A diffusers example's step: fp32 weights under bf16 autocast, diffusers' SDPA processor and its own
    gradient checkpointing of every block, the eager noise chain, torch AdamW, gradient clipping;
    `compile_blocks`: each transformer block through torch.compile, the most a user gets for free."""
    model = build_transformer(dataclasses.replace(cfg.model, dtype="fp32", gradient_checkpointing="none"),
                              seed=cfg.run.seed).to(device).train()
    model.enable_gradient_checkpointing()  # as the diffusers CogVideoX example's --gradient_checkpointing does
    if compile_blocks:
        for block in model.transformer_blocks:
            block.compile()
    opt, abar, data = _optimizer_and_data(cfg, model)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.deepspeed.precision == "bf16")
    times, rotary = [], {}
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next(data)
        x0, image, prompt = (batch[k].to(device) for k in ("video_latents", "image_latents", "prompt_embeds"))
        t = torch.randint(cfg.diffusion.t_min, cfg.diffusion.t_max + 1, (x0.shape[0],))
        sqrt_a, sqrt_1ma = diffusion.coefficients(abar, t)
        model_input, target = stock_chain(x0, image, sqrt_a.to(device), sqrt_1ma.to(device))
        shape = (x0.shape[1], x0.shape[3], x0.shape[4])
        if shape not in rotary:
            rotary[shape] = rotary_embeddings(model.config, *shape, device)
        with autocast:
            pred = predict(model, model_input, prompt, t.to(device), cfg.diffusion.ofs, rotary[shape])
        _backward_and_step(diffusion.loss_v_mse(pred, target), model, opt, cfg, device)
        times.append(time.perf_counter() - t0)
        if after_step is not None:
            after_step()
    info = {"checkpointing": "all (diffusers)", "optimizer": optimizer_name(opt), "compile": compile_blocks,
            "attention_requested": "torch SDPA, default backend"}
    return times, info


def trainer_run(cfg, env, after_step) -> tuple[list[float], dict]:
    """The real Trainer, `auto` resolved as launcher/train.py does; `after_step` runs after each step's telemetry record."""
    setting, line = checkpointing_at_start(cfg, env.world_size)
    trainer = Trainer(cfg, env, checkpointing=(setting, line))
    record = trainer.telemetry.record_step

    def record_then_hook(*args, **kwargs):
        record(*args, **kwargs)
        after_step()

    trainer.telemetry.record_step = record_then_hook
    try:
        trainer.train()
        info = {"checkpointing": str(effective(cfg.model.gradient_checkpointing, setting)),
                "checkpointing_line": line, "optimizer": optimizer_name(trainer.engine.optimizer),
                "compile": cfg.model.compile == "blocks", "attention_requested": cfg.kernels.attention}
    finally:
        trainer.close()
    with open(os.path.join(cfg.run.output_dir, "metrics.jsonl")) as f:
        times = [json.loads(line)["step_time_s"] for line in f]
    del trainer
    return times, info


def _peak_memory(device) -> dict:
    if device.type != "cuda":
        return {"peak_mem_gb": None, "peak_mem_reserved_gb": None}
    return {"peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
            "peak_mem_reserved_gb": torch.cuda.max_memory_reserved() / 2**30}


def _fresh_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_variant(name: str, args, env, smoke: bool, latents: str, out: str) -> dict:
    """One variant's timed steps, then PROFILED_STEPS more under the profiler; a fresh model each."""
    device, total = env.device, args.steps + PROFILED_STEPS
    checkpointing = name.split("-", 1)[1] if name.startswith("i2v-") else "none"
    fp8 = name.rsplit("-", 1)[1] if name.startswith("i2v-fp8-") else "none"
    compile_setting = "blocks" if name == "i2v-compile" or fp8 != "none" else "none"
    if compile_setting == "blocks":
        checkpointing = "auto"
    cfg = shape_config(smoke, args.layers, total, latents, os.path.join(out, name), checkpointing, compile_setting, fp8)
    _fresh_memory(device)
    t0 = time.perf_counter()
    if name.startswith("stock"):
        runner = lambda hook: stock_loop(cfg, total, device, hook, compile_blocks=name == "stock-compile")  # noqa: E731
    else:
        runner = lambda hook: trainer_run(cfg, env, hook)  # noqa: E731
    ran = {}
    profile = profile_steps(lambda hook: ran.update(zip(("times", "info"), runner(hook))), args.steps, PROFILED_STEPS,
                            device)
    times = ran["times"][:args.steps]
    step_s = statistics.median(times[args.warmup:])
    return {"variant": name, **ran["info"], "step_s": step_s, "samples_per_s": 1 / step_s, "step_times_s": times,
            "wall_s": time.perf_counter() - t0, **_peak_memory(device), "profile": profile}


def shape_benchmark(args) -> dict:
    env = init_distributed()
    device, smoke = env.device, env.device.type != "cuda"
    name = torch.cuda.get_device_name() if not smoke else f"cpu-{os.cpu_count()}cores"
    peak = args.peak_tflops or default_peak_tflops(name)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    with tempfile.TemporaryDirectory() as tmp:
        latents, out = os.path.join(tmp, "latents"), os.path.join(tmp, "run")
        os.makedirs(latents)
        cfg = shape_config(smoke, args.layers, args.steps, latents, out)
        write_random_latents(latents, cfg, shards=1, per_shard=4)
        arch = transformer_arch(cfg.model)
        latent = latent_shape(cfg)
        results = []
        for variant in variants:
            print(f"== {variant}", flush=True)
            results.append(run_variant(variant, args, env, smoke, latents, out))
    total_gib = torch.cuda.get_device_properties(device).total_memory / 2**30 if not smoke else 64.0
    plan = make_plan(cfg, gpus=1, gpu_mem_gb=total_gib, peak_tflops=peak)
    model_flops = training_flops(arch, *latent, gradient_checkpointing="none")
    for r in results:
        setting = "all" if r["variant"].startswith("stock") else r["checkpointing"]
        hardware = training_flops(arch, *latent, gradient_checkpointing=setting).hardware
        tflops = model_flops.model / r["step_s"] / 1e12
        r.update(tflops=tflops, mfu=tflops / peak if peak else None,
                 hfu=hardware / r["step_s"] / 1e12 / peak if peak else None)
    by_name = {r["variant"]: r for r in results}
    speedups = {}
    pairs = [(ours, theirs) for ours in ("i2v-all", "i2v-auto", "i2v-compile") for theirs in ("stock", "stock-compile")]
    pairs += [(f"i2v-fp8-{recipe}", "i2v-compile") for recipe in ("rowwise", "tensorwise")]  # goal: >= 1.2x bf16
    for ours, theirs in pairs:
        if ours in by_name and theirs in by_name:
            speedups[f"{ours}_vs_{theirs}"] = by_name[theirs]["step_s"] / by_name[ours]["step_s"]
    commit, dirty = git_commit("i2v", "bench", "configs")
    measured = by_name.get("i2v-all", {}).get("peak_mem_gb")
    return {
        "mode": "cpu-smoke" if smoke else "gpu", "device": name, "torch": torch.__version__,
        "python": platform.python_version(), "versions": _versions(), "commit": commit, "dirty": dirty,
        "command": "python bench/train_step.py " + " ".join(sys.argv[1:]),
        "shape": args.shape, "layers": arch["num_layers"], "latent": list(latent), "tokens": model_flops.tokens,
        "params": plan.counts.total, "model_flops_per_sample": model_flops.model,
        "peak_tflops": peak, "steps": args.steps, "warmup": args.warmup, "profiled_steps": PROFILED_STEPS,
        "zero_stage": cfg.deepspeed.zero_stage, "precision": cfg.deepspeed.precision,
        "variants": results, "speedups": speedups,
        "goals": {"i2v-auto_vs_stock": 1.3, "i2v-auto_vs_stock-compile": 1.1, "i2v-auto_mfu": 0.4},
        "planner": {"peak_gb": plan.peak_bytes / 2**30, "measured_peak_gb": measured,
                    "estimate_over_measured": plan.peak_bytes / 2**30 / measured if measured else None,
                    "state_gb": plan.state.device / 2**30, "activations_gb": plan.activations["all"].peak / 2**30},
    }


def _versions() -> dict:
    import importlib.metadata as md

    found = {}
    for package in ("deepspeed", "diffusers", "triton"):
        try:
            found[package] = md.version(package)
        except md.PackageNotFoundError:
            found[package] = None
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--shape", choices=["5b"], default=None, help="the real-shape benchmark (see above)")
    ap.add_argument("--layers", type=int, default=42, help="--shape 5b: transformer blocks of the 42")
    ap.add_argument("--peak-tflops", type=float, default=None, help="--shape 5b: MFU denominator (default: by device)")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help=f"--shape 5b: comma-separated, of {', '.join(VARIANTS)} (default: the first five)")
    ap.add_argument("--out", default=None, help="--shape 5b: the JSON to write (default bench/results/train_step-5b-<gpu>.json)")
    ap.add_argument("--steps", type=int, default=None, help="steps per side (default 40; 8 with --shape)")
    ap.add_argument("--warmup", type=int, default=None, help="steps left out of the median (default 5; 3 with --shape)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    args.steps = args.steps or (8 if args.shape else 40)
    args.warmup = args.warmup if args.warmup is not None else (3 if args.shape else 5)
    if args.shape:
        result = shape_benchmark(args)
        write_result("train_step-5b", result["device"], result["mode"] == "cpu-smoke", result,
                     out=args.out)
        for r in result["variants"]:
            mfu = f", MFU {r['mfu']:.1%}, HFU {r['hfu']:.1%}" if r["mfu"] is not None else ""
            mem = f", peak {r['peak_mem_gb']:.1f} GiB" if r["peak_mem_gb"] is not None else ""
            print(f"{r['variant']:14s} {r['step_s']:.3f} s/step, {r['tflops']:.3g} TFLOP/s{mfu}{mem} | "
                  f"checkpointing {r['checkpointing']}, compile {r['compile']}, {r['optimizer']}")
        for r in result["variants"]:
            print_table(r["variant"], r["profile"])
        for key, value in result["speedups"].items():
            print(f"speedup {key} {value:.2f}x")
        plan = result["planner"]
        if plan["measured_peak_gb"]:
            print(f"planner {plan['peak_gb']:.2f} GiB estimated vs {plan['measured_peak_gb']:.2f} GiB "
                  f"max_memory_allocated for i2v-all ({plan['estimate_over_measured']:.3f})")
        if args.json:
            print(json.dumps(result))
        return

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
