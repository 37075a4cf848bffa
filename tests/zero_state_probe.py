"""Bytes a real DeepSpeed engine holds, next to what `i2v.plan.memory.state_bytes` predicts.

    python tests/zero_state_probe.py STAGE:PRECISION[:offload] ...     (or under torchrun)

For each case: the run's own engine (i2v.train.optim.build_engine on the generated DeepSpeed config)
around the mid-size test model (under optimizer offload: the same config, with torch's AdamW in place
of DeepSpeed's CPU Adam, whose state is the same fp32 master copy and two moments in host memory: that
C++ op is compiled at its first use, 2-3 minutes on two cores, which the bytes here do not need), two optimizer steps on a small input, then a walk over every
tensor the engine's module and optimizer reach (parameters, their gradients and ZeRO shards, the
optimizer's state, master copies, gradient partitions and buckets), each storage counted once.
Measured at the fullest point, after the last backward and before its step. Rank 0 prints one
JSON line per case.
"""

from __future__ import annotations

import gc
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from i2v.config import load_config, resolve  # noqa: E402
from i2v.core.distributed import init_distributed, shutdown  # noqa: E402
from i2v.train.ds_config import build_deepspeed_config  # noqa: E402
from i2v.plan.memory import ParamCounts, ZeroSettings, state_bytes  # noqa: E402
from i2v.model.transformer import build_transformer  # noqa: E402
from i2v.train.optim import build_engine  # noqa: E402

# d = 512: the attention projections are above ZeRO-3's persistence threshold, the norms below.
ARCH = dict(num_attention_heads=8, attention_head_dim=64, in_channels=8, out_channels=4, time_embed_dim=64,
            text_embed_dim=64, num_layers=2, sample_frames=9, sample_height=8, sample_width=8,
            max_text_seq_length=8, use_rotary_positional_embeddings=True)


def held_bytes(engine) -> dict:
    """Bytes per kind of every tensor storage reachable from the engine's module and optimizer."""
    seen: dict[int, tuple[str, int]] = {}
    visited: set[int] = set()

    def walk(obj, kind: str, depth: int) -> None:
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() and storage.data_ptr() not in seen:
                seen[storage.data_ptr()] = (kind, storage.nbytes())
            return
        if depth > 6 or id(obj) in visited or isinstance(obj, (str, bytes, int, float, torch.nn.Module)):
            return
        visited.add(id(obj))
        if isinstance(obj, dict):
            for key, value in obj.items():
                walk(value, "buckets" if "ipg" in str(key) else kind, depth + 1)
        elif isinstance(obj, (list, tuple, set)):
            for value in obj:
                walk(value, kind, depth + 1)
        elif hasattr(obj, "__dict__"):
            for key, value in vars(obj).items():
                walk(value, "buckets" if "ipg" in key else kind, depth + 1)

    for p in engine.module.parameters():
        for t in (p, p.grad, getattr(p, "ds_tensor", None)):
            if t is not None:
                walk(t, "state", 0)
    walk(engine.optimizer, "state", 0)
    out = {"state": 0, "buckets": 0}
    for kind, nbytes in seen.values():
        out[kind] += nbytes
    return out


def offload_engine(cfg, model, env):
    """build_engine's engine under optimizer offload, stepping torch's AdamW instead of DeepSpeed's CPU Adam."""
    import deepspeed

    from i2v.train.optim import build_lr_schedule, build_optimizer, param_groups

    ds = build_deepspeed_config(cfg, resolve(cfg, env.world_size))
    del ds["optimizer"]
    ds["zero_force_ds_cpu_optimizer"] = False
    optimizer = build_optimizer(cfg, param_groups(cfg, model), torch.device("cpu"))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=build_lr_schedule(cfg),
                                           config=ds)
    return engine


def run_case(spec: str, env) -> dict:
    stage, precision, *flags = spec.split(":")
    offload = "offload" in flags
    overrides = [f"deepspeed.zero_stage={stage}", f"deepspeed.precision={precision}",
                 f"deepspeed.offload_optimizer={str(offload).lower()}",
                 "run.output_dir=/unused", "data.latent_shards=/unused", "model.dtype=fp32"]
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml"), overrides)
    cfg.model.arch = dict(ARCH)
    model = build_transformer(cfg.model)
    counts = ParamCounts.of(model)
    engine = build_engine(cfg, model, resolve(cfg, env.world_size)) if not offload else offload_engine(cfg, model, env)
    dtype = next(engine.module.parameters()).dtype
    g = torch.Generator().manual_seed(env.rank)
    x, text = torch.randn(1, 3, 8, 8, 8, generator=g), torch.randn(1, 8, 64, generator=g)
    for step in range(2):
        out = engine(hidden_states=x.to(dtype), encoder_hidden_states=text.to(dtype),
                     timestep=torch.tensor([500]), return_dict=False)[0]
        engine.backward(out.float().square().mean())
        del out
        if step == 1:
            held = held_bytes(engine)
        engine.step()
    ds = build_deepspeed_config(cfg, resolve(cfg, env.world_size))
    zero = ZeroSettings.from_deepspeed(ds["zero_optimization"])
    want = state_bytes(counts, zero, precision, env.world_size)
    result = {"case": spec, "world_size": env.world_size, "params": counts.total, "held_state": held["state"],
              "held_buckets": held["buckets"], "want_state": want.weights + want.gradients + want.optimizer
              + want.offloaded, "want_reduce_bucket": zero.reduce_bucket_size * (2 if precision != "fp32" else 4)}
    del engine
    gc.collect()  # DeepSpeed's hooks and groups go while the process group still lives
    return result


def main() -> None:
    env = init_distributed()
    try:
        for spec in sys.argv[1:]:
            result = run_case(spec, env)
            if env.is_main:
                print(json.dumps(result), flush=True)
    except BaseException:
        shutdown(clean=False)
        raise
    # Measured and printed; once every rank is here, leave without tearing the engines' groups down. The
    # teardown once aborted after a ZeRO-3 case ("terminate called without an active exception", from a
    # communication thread's destructor), which is not what this probe measures. The trainer's own
    # teardown is i2v.core.distributed.shutdown.
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
