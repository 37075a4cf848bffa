"""`make demo` end to end with small settings: clips -> shards -> VAE fit -> latents -> train -> sample."""

from __future__ import annotations

import json
import os
import subprocess

import av
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO


def test_demo_script_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "DEMO_DIR": str(out), "DEMO_CLIPS": "8", "DEMO_PER_SHARD": "4", "DEMO_VAE_STEPS": "5",
           "DEMO_TRAIN_STEPS": "4",
           "DEMO_SAMPLE_STEPS": "2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "launcher" / "demo.sh")], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    manifest = json.loads((out / "latents" / "manifest.json").read_text())
    assert manifest["samples"] == 8 and len(manifest["shards"]) == 2
    # Every stage after the fit uses the fitted VAE, not the random-init one.
    fitted = json.loads((out / "vae" / "config.json").read_text())
    assert manifest["vae"]["source"] == "pretrained" and manifest["vae"]["path"] == str(out / "vae")
    assert manifest["vae"]["scaling_factor"] == fitted["scaling_factor"] != 1.0

    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert acc.Tags()["scalars"], "no scalars in the TensorBoard events"
    assert "validation/pair-0" in acc.Tags()["images"], acc.Tags()
    assert sorted(p.parent.name for p in (out / "samples").glob("step-*/pair-0.mp4")) == [
        "step-00000002", "step-00000004"]

    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert (out / "checkpoints" / latest).is_dir() and latest.endswith("4")

    with Image.open(out / "samples" / "heldout.gif") as gif:
        assert gif.n_frames == 9 and gif.size == (64, 64)
    with av.open(str(out / "samples" / "heldout.mp4")) as mp4:
        assert sum(1 for _ in mp4.decode(video=0)) == 9
    assert f"--logdir {out}/tensorboard" in proc.stdout
    assert f"{out}/samples/heldout.gif" in proc.stdout
