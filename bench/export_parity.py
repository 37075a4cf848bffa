"""Does an export sample in diffusers as i2v does? The pipeline, loaded from the export and called exactly as
the export's README.md says, against `launcher/sample.py`'s own sampler, on held-out first frames.

    python bench/export_parity.py --run runs/demo [--pairs 4] [--out bench/results/export-parity-demo.json]

Exports the run's newest checkpoint to RUN/export (if not there yet) with `launcher/export.py`'s code, then
for each held-out pair draws the clip both ways with the same seed and reports the mean absolute
difference per frame on [0, 1], from tensors (no GIF or MP4 quantisation). A CPU measurement.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _kernels import RESULTS, git_commit, write_result  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/demo", help="a finished run directory (config.yaml, checkpoints/)")
    p.add_argument("--pairs", type=int, default=4, help="held-out pairs to compare (from the run's evaluation stream)")
    p.add_argument("--out", default=str(RESULTS / "export-parity-demo.json"))
    a = p.parse_args(argv)

    import diffusers
    from diffusers import CogVideoXImageToVideoPipeline
    from PIL import Image

    from i2v.config import load_config
    from i2v.data.synthetic import heldout_specs, render
    from i2v.checkpoint.commit import resolve_committed
    from i2v.sample.export import export_pipeline, pipeline_call
    from i2v.sample.sampling import sample_from_checkpoint

    cfg = load_config(os.path.join(a.run, "config.yaml"))
    checkpoint = resolve_committed(os.path.join(a.run, "checkpoints"))
    out = os.path.join(a.run, "export")
    if not os.path.isfile(os.path.join(out, "README.md")):
        export_pipeline(cfg, checkpoint, out)
    call = pipeline_call(cfg)
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(out)
    if os.path.isfile(os.path.join(out, "pytorch_lora_weights.safetensors")):
        pipe.load_lora_weights(out)
    pipe.set_progress_bar_config(disable=True)

    v = cfg.data.video
    specs = heldout_specs(a.pairs, seed=cfg.run.seed, frames=v.frames, width=v.width, height=v.height)
    pairs, start = [], time.time()
    for i, spec in enumerate(specs):  # the evaluation's held-out pairs: first frame at the trained size
        first = render(spec, 0, v.width, v.height)  # uint8 [H, W, 3]: no resize on either side
        image = torch.from_numpy(first.copy()).permute(2, 0, 1).float() / 127.5 - 1.0
        ours = sample_from_checkpoint(cfg, checkpoint, image, spec.caption, num_frames=call["num_frames"],
                                      num_inference_steps=call["num_inference_steps"],
                                      guidance_scale=call["guidance_scale"], seed=i)
        ours = (ours.float() + 1) / 2
        theirs = pipe(image=Image.fromarray(first), prompt=spec.caption, **call, use_dynamic_cfg=False,
                      output_type="pt", generator=torch.Generator().manual_seed(i)).frames[0].float()
        diff = (theirs - ours).abs().mean(dim=(1, 2, 3)).tolist()
        pairs.append({"caption": spec.caption, "seed": i, "mad_per_frame": diff})
        print(f"pair {i} ({spec.caption}): mean |diffusers - i2v| per frame max {max(diff):.5f}", flush=True)
    worst = max(max(p["mad_per_frame"]) for p in pairs)
    commit, dirty = git_commit()
    record = {
        "what": "mean absolute difference per frame on [0, 1]: diffusers' pipeline from the export vs i2v's sampler",
        "run": a.run, "checkpoint": checkpoint, "call": call, "pairs": pairs, "worst": worst, "target": 0.01,
        "seconds": round(time.time() - start, 1), "device": "cpu", "commit": commit, "dirty": dirty,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
    }
    path = write_result("export-parity", "cpu", False, record, out=a.out)
    print(f"worst frame: {worst:.5f} (target <= 0.01) -> {path}", flush=True)
    return record


if __name__ == "__main__":
    main()
