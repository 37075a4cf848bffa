"""Does float8 hurt learning? The demo recipe trained with and without it, on the CPU by emulation.

    python bench/fp8_quality.py [--dir runs/fp8-quality] [--steps 3000] [--variants fp32,tensorwise,...]
                                [--out bench/results/fp8-quality.json]

Each variant is a whole `launcher/demo.sh` run (same synthetic clips, VAE, latents and run.seed; its own
DEMO_DIR) with extra overrides through DEMO_OVERRIDES:

| variant      | overrides                                                  | compared with |
|--------------|------------------------------------------------------------|---------------|
| fp32         | none: `make demo`'s recipe                                 |               |
| tensorwise   | model.fp8.compute=tensorwise                               | fp32          |
| rowwise      | model.fp8.compute=rowwise                                  | fp32          |
| lora         | LoRA rank 32 on the blocks' six linears, proj_out trained  |               |
| lora-e4m3    | the same, model.fp8.base=e4m3                              | lora          |

On the CPU torchao emulates the float8 matmuls: the same casts to e4m3 / e5m2 with the same scales, the
products in fp32. So these runs measure the quantisation's effect on learning, not float8 speed. The LoRA
variant trains adapters on the tiny DiT's random-init base (the demo has no pretrained one): its figures
are lower than a full fine-tune's; what counts is the float8 base against the same LoRA run unquantised.

Per variant it records the final loss (the mean of the logged losses of the last 200 steps), the
evaluation's first-frame fidelity and caption motion on the held-out pairs, and the seconds it took;
per compared variant the loss relative to its reference and the difference in pairs. Goals (the issue's):
both evaluation figures within one pair, and the final loss within 5%. A variant whose final checkpoint
and evaluation exist is kept (demo.sh resumes), so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _kernels import REPO, RESULTS, git_commit, write_result  # noqa: E402

LORA = ["model.lora.rank=32", "model.lora.alpha=32",
        "model.lora.target_modules=[to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2]",
        "model.lora.extra_trainable=[proj_out]"]
VARIANTS = {
    "fp32": ([], None),
    "tensorwise": (["model.fp8.compute=tensorwise"], "fp32"),
    "rowwise": (["model.fp8.compute=rowwise"], "fp32"),
    "lora": (LORA, None),
    "lora-e4m3": (LORA + ["model.fp8.base=e4m3"], "lora"),
}
LOSS_WINDOW = 200  # steps at the end whose logged losses are averaged
GOALS = {"pairs": 1, "loss_relative": 0.05}


def final_loss(metrics: str, steps: int) -> float:
    losses = []
    with open(metrics) as f:
        for line in f:
            rec = json.loads(line)
            if "loss" in rec and rec.get("step", 0) > steps - LOSS_WINDOW:
                losses.append(rec["loss"])
    if not losses:
        raise SystemExit(f"{metrics}: no loss logged in the last {LOSS_WINDOW} steps")
    return sum(losses) / len(losses)


def run_variant(name: str, overrides: list[str], root: str, steps: int, python: str) -> dict:
    out = os.path.join(root, name)
    os.makedirs(out, exist_ok=True)
    env = {**os.environ, "DEMO_DIR": out, "DEMO_QUALITY_JSON": "", "DEMO_TRAIN_STEPS": str(steps),
           "DEMO_OVERRIDES": " ".join(overrides), "PYTHON": python}
    log = os.path.join(root, f"{name}.log")
    print(f"== {name}: launcher/demo.sh with {' '.join(overrides) or 'the demo recipe'} (log: {log})", flush=True)
    start = time.time()
    with open(log, "w") as f:
        r = subprocess.run(["bash", "launcher/demo.sh"], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds = round(time.time() - start)
    if r.returncode != 0:
        raise SystemExit(f"{name}: launcher/demo.sh exited {r.returncode}; see {log}")
    with open(os.path.join(out, "eval.json")) as f:
        report = json.load(f)
    row = {"overrides": overrides, "seconds": seconds, "final_loss": final_loss(os.path.join(out, "metrics.jsonl"), steps),
           "pairs": report["pairs"], "first_frame_fidelity": report["first_frame_fidelity"],
           "caption_motion": report["caption_motion"]}
    print(f"   {seconds} s: final loss {row['final_loss']:.4f}, first-frame fidelity {row['first_frame_fidelity']:.0%}, "
          f"caption motion {row['caption_motion']:.0%}", flush=True)
    return row


def compare(row: dict, ref: dict) -> dict:
    pairs = row["pairs"]
    fidelity = round((row["first_frame_fidelity"] - ref["first_frame_fidelity"]) * pairs)
    motion = round((row["caption_motion"] - ref["caption_motion"]) * pairs)
    loss = row["final_loss"] / ref["final_loss"] - 1
    return {"fidelity_pairs": fidelity, "motion_pairs": motion, "loss_relative": round(loss, 4),
            "meets_goals": abs(fidelity) <= GOALS["pairs"] and abs(motion) <= GOALS["pairs"]
            and abs(loss) <= GOALS["loss_relative"]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=str(REPO / "runs" / "fp8-quality"))
    p.add_argument("--steps", type=int, default=3000, help="training steps of every variant (the demo's 3000)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--out", default=str(RESULTS / "fp8-quality.json"))
    a = p.parse_args(argv)
    names = [v for v in a.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}; expected some of {', '.join(VARIANTS)}")
    for name in list(names):  # a compared variant needs its reference
        ref = VARIANTS[name][1]
        if ref and ref not in names:
            names.insert(names.index(name), ref)
    python = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
    from i2v.model.fp8 import torchao_version

    rows = {name: run_variant(name, VARIANTS[name][0], a.dir, a.steps, python) for name in names}
    comparisons = {name: {"against": VARIANTS[name][1], **compare(rows[name], rows[VARIANTS[name][1]])}
                   for name in names if VARIANTS[name][1]}
    print(f"\n{'variant':12s} {'final loss':>10s} {'fidelity':>9s} {'motion':>7s}   against: loss, pairs (fidelity, motion)")
    for name, row in rows.items():
        c = comparisons.get(name)
        vs = (f"   {c['against']}: {c['loss_relative']:+.1%}, {c['fidelity_pairs']:+d}, {c['motion_pairs']:+d}"
              f"{'' if c['meets_goals'] else '  MISSES the goals'}") if c else ""
        print(f"{name:12s} {row['final_loss']:10.4f} {row['first_frame_fidelity']:9.0%} {row['caption_motion']:7.0%}{vs}")
    commit, dirty = git_commit()
    record = {"mode": "CPU, float8 emulated by torchao (quantisation only, no float8 matmul)", "commit": commit,
              "dirty": dirty, "torchao": torchao_version(), "steps": a.steps, "loss_window": LOSS_WINDOW,
              "goals": GOALS, "variants": rows, "comparisons": comparisons}
    write_result("fp8-quality", "cpu", False, record, out=a.out)
    return record


if __name__ == "__main__":
    main()
