"""What full fine-tuning and LoRA cost in state memory and checkpoint size, for the real CogVideoX models.

    python bench/memory.py [--out bench/results/memory-lora-ema.json]

Each model is built from its shipped config (`configs/cogvideox-{5b,2b}-i2v.yaml`, architecture from
`model.arch_file`) on PyTorch's meta device: no weights are read and nothing is allocated. LoRA adapters
go on the four attention projections at ranks 64 and 128 (alpha = rank / 2), as
`configs/cogvideox-5b-i2v-lora.yaml` does; `lora-r128-e4m3` is rank 128 with those projections' frozen
base stored in float8 (`model.fp8.base: e4m3`), for CogVideoX-5B-I2V and CogVideoX1.5-5B-I2V; `-ff` puts
the adapters (and so the float8 base) on the feed-forward layers too. For ZeRO-2 bf16 with an fp32 EMA, on 1 rank and on 8, it
prints and records: trainable parameters, weight bytes per rank, optimizer-state bytes per rank (fp32 master copy and AdamW
moments), EMA bytes per rank, and the bytes of one checkpoint (all ranks' files together).

The figures are the planner's (`i2v.plan.planner.make_plan`, i.e. `i2v.plan.memory.state_bytes`) and
`i2v.plan.memory.checkpoint_bytes`. The test suite checks
them on the CPU against what a real two-rank engine holds (tests/test_memory.py) and against the
tensors a LoRA and a full checkpoint of the tiny model write (tests/test_lora_ema.py).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _kernels import REPO, RESULTS, git_commit, write_result  # noqa: E402

from i2v.config import load_config  # noqa: E402
from i2v.plan.memory import checkpoint_bytes  # noqa: E402
from i2v.plan.planner import make_plan  # noqa: E402

MODELS = {"CogVideoX-5b-I2V": "cogvideox-5b-i2v.yaml", "CogVideoX-2b-I2V": "cogvideox-2b-i2v.yaml",
          "CogVideoX1.5-5B-I2V": "cogvideox-1.5-5b-i2v.yaml"}
VARIANTS = {"full": [], "lora-r64": ["model.lora.rank=64", "model.lora.alpha=32"],
            "lora-r128": ["model.lora.rank=128", "model.lora.alpha=64"],
            "lora-r128-e4m3": ["model.lora.rank=128", "model.lora.alpha=64", "model.fp8.base=e4m3"]}
# Adapters on the feed-forward layers too put most of the base in float8.
_ATTN_FF = "model.lora.target_modules=[to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2]"
VARIANTS.update({"lora-r128-ff": [*VARIANTS["lora-r128"], _ATTN_FF], "lora-r128-ff-e4m3": [*VARIANTS["lora-r128-e4m3"], _ATTN_FF]})
# The float8 base (model.fp8.base) is priced for the two 5B models' r128 LoRA, beside the same LoRA in bf16.
ROWS = [(m, v) for m in ("CogVideoX-5b-I2V", "CogVideoX-2b-I2V") for v in ("full", "lora-r64", "lora-r128")] + [
    ("CogVideoX-5b-I2V", "lora-r128-e4m3")] + [("CogVideoX1.5-5B-I2V", v) for v in
                                                ("lora-r128", "lora-r128-e4m3", "lora-r128-ff", "lora-r128-ff-e4m3")]
WORLD_SIZES = (1, 8)
SETTINGS = ["deepspeed.zero_stage=2", "deepspeed.precision=bf16", "model.dtype=bf16", "train.ema.decay=0.999"]


def measure(config: str, overrides: list[str], world_size: int) -> dict:
    cfg = load_config(REPO / "configs" / config, [*SETTINGS, *overrides])
    plan = make_plan(cfg, world_size, gpu_mem_gb=80)  # the planner's meta-device model, LoRA and EMA included
    counts, state = plan.counts, plan.state
    lora = cfg.model.lora.rank > 0
    return {
        "world_size": world_size,
        "parameters": counts.total,
        "trainable": counts.trainable,
        "optimizer_state_bytes_per_rank": state.optimizer + state.offloaded,
        "ema_bytes_per_rank": state.ema,
        "weights_bytes_per_rank": state.weights,
        "gradient_bytes_per_rank": state.gradients,
        "checkpoint_bytes": checkpoint_bytes(counts, cfg.deepspeed.zero_stage, cfg.deepspeed.precision, ema=True,
                                             model_dtype=cfg.model.dtype, trainable_only=lora),
    }


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(RESULTS / "memory-lora-ema.json"))
    args = p.parse_args(argv)
    rows = []
    print("ZeRO-2 bf16 with an fp32 EMA; bytes in GiB")
    print(f"{'model':19s} {'variant':17s} ranks      trainable  weights/rank  optimizer/rank  EMA/rank  checkpoint")
    for model, variant in ROWS:
        for world_size in WORLD_SIZES:
            row = {"model": model, "variant": variant, **measure(MODELS[model], VARIANTS[variant], world_size)}
            rows.append(row)
            print(f"{model:19s} {variant:17s} {world_size:5d}  {row['trainable']:>13,}  {gib(row['weights_bytes_per_rank']):>12s}  "
                  f"{gib(row['optimizer_state_bytes_per_rank']):>14s}  {gib(row['ema_bytes_per_rank']):>8s}  "
                  f"{gib(row['checkpoint_bytes']):>10s}")
    commit, dirty = git_commit("i2v/plan/memory.py", "i2v/model/adapters.py", "i2v/model/fp8.py", "bench/memory.py")
    record = {"commit": commit, "dirty": dirty, "settings": SETTINGS,
              "lora_targets": {v: next((o.split("=", 1)[1] for o in VARIANTS[v] if "target_modules" in o), "[to_q,to_k,to_v,to_out.0]") for v in VARIANTS}, "rows": rows}
    write_result("memory", "cpu", False, record, out=args.out)
    return record


if __name__ == "__main__":
    main()
