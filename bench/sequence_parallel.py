"""Sequence parallelism: what SP 1/2/4/8 costs and saves, from the architecture and measured on this machine.

    python bench/sequence_parallel.py [--steps 12] [--warmup 3] [--shape 13x16x24] [--no-measure]

1. From the architecture (configs/arch/*.json), micro-batch 1, bf16, for SP 1, 2, 4 and 8, at the
   CogVideoX-5B shape (49x480x720 clips: 13x60x90 latents) and a CogVideoX-1.5 shape
   (81x768x1360 clips: 21x96x170 latents):
   - all-to-all bytes each rank sends per layer and step (`i2v.model.parallel.all_to_all_bytes`);
   - activation memory per rank (`i2v.plan.memory.activation_bytes`, the planner's model) without and
     with gradient checkpointing, and its ratio to SP 1 (goal: <= 0.55 at SP 2);
   - the communication overhead: the step's all-to-all time at an *assumed* per-rank bandwidth
     over the rank's compute time at an *assumed* throughput (FLOPs from `i2v.model.flops`). The
     all-to-alls are not overlapped with compute, so this is added step time.
2. Measured (gloo on the CPU; NCCL wherever CUDA is): the tiny model of configs/tiny.yaml on longer
   latents (--shape, latent frames x height x width), ZeRO-2 fp32, SP 1 on 1 rank and SP 2 on 2
   ranks through the trainer's loss, engine and layout: median step time after a warm-up, bytes
   saved for backward per rank (autograd's saved tensors, unique storages, parameters excluded)
   next to the memory model's estimate, and the all-to-all bytes a rank sends per step, counted at
   `all_to_all_single` and checked against the formula.
Results: bench/results/sequence_parallel-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from _kernels import git_commit, write_result  # noqa: E402

SHAPES = {  # name -> (architecture file, latent frames, height, width)
    "CogVideoX-5B 49x480x720": ("cogvideox-5b-i2v.json", 13, 60, 90),
    "CogVideoX-1.5 81x768x1360": ("cogvideox-1.5-5b-i2v.json", 21, 96, 170),
}
SP_SIZES = (1, 2, 4, 8)
# Assumptions for the overhead estimate (not measurements): an H200 node, NVLink all-to-all.
ASSUMED_BANDWIDTH = 300e9  # bytes/s one rank sends in an intra-node all-to-all
ASSUMED_THROUGHPUT = 400e12  # FLOP/s a rank sustains (about 40% of the H200's dense bf16 peak)


def from_architecture() -> list[dict]:
    from i2v.model.flops import training_flops
    from i2v.plan.memory import activation_bytes
    from i2v.model.parallel import all_to_all_bytes

    rows = []
    for name, (arch_file, f, h, w) in SHAPES.items():
        config = json.loads((REPO / "configs" / "arch" / arch_file).read_text())
        flops = training_flops(config, f, h, w).model
        base = {ckpt: activation_bytes(config, f, h, w, 1, 2, ckpt).peak for ckpt in (False, True)}
        for sp in SP_SIZES:
            act = {ckpt: activation_bytes(config, f, h, w, 1, 2, ckpt, sequence_parallel_size=sp).peak
                   for ckpt in (False, True)}
            layer = all_to_all_bytes(config, f, h, w, 1, 2, sp)
            comm_s = layer * config["num_layers"] / ASSUMED_BANDWIDTH
            compute_s = flops / sp / ASSUMED_THROUGHPUT
            rows.append({
                "shape": name, "sp": sp, "video_tokens": training_flops(config, f, h, w).video_tokens,
                "all_to_all_bytes_per_layer_step": layer,
                "all_to_all_bytes_per_step": layer * config["num_layers"],
                "activation_bytes_per_rank": act[False], "activation_ratio_to_sp1": act[False] / base[False],
                "activation_bytes_per_rank_checkpointed": act[True],
                "activation_ratio_to_sp1_checkpointed": act[True] / base[True],
                "compute_s_per_rank": compute_s, "all_to_all_s": comm_s, "overhead": comm_s / compute_s,
            })
    return rows


# --------------------------------------------------------------------------- measured


def worker(args) -> None:
    """One rank of the measured part (started by `measure` with its rank in the environment)."""
    from i2v.config import load_config, resolve
    from i2v.core.distributed import init_distributed, shutdown
    from i2v.plan.memory import activation_bytes
    from i2v.model.transformer import build_transformer, set_attention
    from i2v.train.objective import Objective
    from i2v.train.optim import build_engine
    from i2v.model.parallel import all_to_all_bytes, build_layout

    env = init_distributed()
    f, h, w = map(int, args.shape.split("x"))
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"parallel.sequence_parallel_size={env.world_size}", "deepspeed.zero_stage=2", "run.output_dir=unused",
        "data.latent_shards=unused", "train.micro_batch_size=1", "train.warmup_steps=0", "kernels.attention=torch"])
    model = build_transformer(cfg.model, seed=0)
    set_attention(model, "torch")
    layout = build_layout(env, cfg, model)
    engine = build_engine(cfg, model, resolve(cfg, env.world_size), layout.mpu)
    c = model.config
    g = torch.Generator().manual_seed(0)
    video = torch.randn(1, f, c.out_channels, h, w, generator=g)
    batch = {"video_latents": video, "image_latents": video[:, :1].clone(),
             "prompt_embeds": torch.randn(1, c.max_text_seq_length, c.text_embed_dim, generator=g)}
    objective = Objective(cfg, env.device, layout=layout)  # tiny.yaml's run.seed is 0
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def step(i: int) -> None:
        loss = objective.loss(engine, batch, i)
        engine.backward(loss)
        engine.step()

    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        step(i)
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)

    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    sent = [0]
    a2a = torch.distributed.all_to_all_single

    def counting(output, input, *a, **k):  # bytes that leave this rank: all rows but its own
        sent[0] += input.numel() * input.element_size() * (env.world_size - 1) // env.world_size
        return a2a(output, input, *a, **k)

    torch.distributed.all_to_all_single = counting
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = objective.loss(engine, batch, 0)
    engine.backward(loss)
    engine.step()
    torch.distributed.all_to_all_single = a2a
    if env.is_main:
        print(json.dumps({
            "sp": env.world_size, "ranks": env.world_size, "latents": args.shape,
            "step_s": statistics.median(times[args.warmup:]), "saved_bytes_per_rank": sum(saved.values()),
            "estimated_bytes_per_rank": activation_bytes(c, f, h, w, 1, 4, False, attention="torch",
                                                         sequence_parallel_size=env.world_size).held,
            "all_to_all_bytes_per_step": sent[0],
            "all_to_all_bytes_per_step_formula": c.num_layers * all_to_all_bytes(c, f, h, w, 1, 4, env.world_size),
        }), flush=True)
    shutdown()


def measure(args) -> list[dict]:
    import socket

    rows = []
    for ranks in (1, 2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        cmd = [sys.executable, __file__, "--worker", "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--shape", args.shape]
        procs = []
        for rank in range(ranks):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
        outs = [p.communicate() for p in procs]
        for p, (_, err) in zip(procs, outs):
            if p.returncode:
                raise SystemExit(f"worker failed:\n{err[-3000:]}")
        rows.append(json.loads(outs[0][0].strip().splitlines()[-1]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--shape", default="13x16x24", help="latent frames x height x width of the measured part")
    ap.add_argument("--no-measure", action="store_true", help="only the figures from the architecture")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    analytic = from_architecture()
    for r in analytic:
        print(f"{r['shape']} SP {r['sp']}: {r['video_tokens']} video tokens | all-to-all "
              f"{r['all_to_all_bytes_per_layer_step'] / 1e6:.1f} MB/layer/step, {r['all_to_all_bytes_per_step'] / 1e9:.2f} GB/step "
              f"| activations/rank {r['activation_bytes_per_rank'] / 2**30:.1f} GiB ({r['activation_ratio_to_sp1']:.3f} of SP 1), "
              f"checkpointed {r['activation_bytes_per_rank_checkpointed'] / 2**30:.2f} GiB "
              f"({r['activation_ratio_to_sp1_checkpointed']:.3f}) | est. overhead {r['overhead']:.1%}")
    measured = [] if args.no_measure else measure(args)
    for r in measured:
        print(f"measured SP {r['sp']} ({r['latents']} latents, tiny model): {r['step_s'] * 1e3:.0f} ms/step | saved for "
              f"backward {r['saved_bytes_per_rank'] / 2**20:.2f} MiB/rank (model {r['estimated_bytes_per_rank'] / 2**20:.2f}) "
              f"| all-to-all {r['all_to_all_bytes_per_step'] / 2**20:.2f} MiB/step "
              f"(formula {r['all_to_all_bytes_per_step_formula'] / 2**20:.2f})")
    if len(measured) == 2:
        print(f"measured SP 2 / SP 1: saved bytes {measured[1]['saved_bytes_per_rank'] / measured[0]['saved_bytes_per_rank']:.3f}, "
              f"step time {measured[1]['step_s'] / measured[0]['step_s']:.2f}")
    commit, dirty = git_commit("i2v", "bench")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu-{os.cpu_count()}cores"
    write_result("sequence_parallel", "cpu" if device.startswith("cpu") else device, False, {
        "device": device, "torch": torch.__version__, "python": platform.python_version(), "commit": commit,
        "dirty": dirty, "load_average": os.getloadavg(),
        "assumptions": {"all_to_all_bytes_per_s_per_rank": ASSUMED_BANDWIDTH, "flop_per_s_per_rank": ASSUMED_THROUGHPUT,
                        "micro_batch": 1, "dtype": "bf16", "gradient_checkpointing": "both shown"},
        "from_architecture": analytic, "measured": measured,
    })


if __name__ == "__main__":
    main()
