"""`make demo` end to end with small settings: clips -> shards -> VAE fit -> latents -> train -> sample ->
evaluate; a rerun keeps every finished stage."""

from __future__ import annotations

import json
import os
import subprocess

import av
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO
from i2v.config import load_config
from i2v.sample.evaluation import ABLATIONS, PAIR_FIELDS, REPORT_FIELDS, SUMMARY_FIELDS

SIZE = load_config(str(REPO / "configs" / "tiny.yaml")).data.video.width  # the demo's frames (DEMO_SIZE unset)

STAGES = ["clips", "shards", "vae", "precompute", "train", "sample", "evaluate"]


def test_demo_script_runs_end_to_end_and_resumes(tmp_path):
    out = tmp_path / "demo"
    quality = tmp_path / "demo-quality.json"
    env = {**os.environ, "DEMO_DIR": str(out), "DEMO_CLIPS": "8", "DEMO_PER_SHARD": "4", "DEMO_VAE": "fit", "DEMO_VAE_STEPS": "5",
           "DEMO_TRAIN_STEPS": "4", "DEMO_SAMPLE_STEPS": "2", "DEMO_EVAL_PAIRS": "2",
           "DEMO_QUALITY_JSON": str(quality), "OMP_NUM_THREADS": "1"}

    def demo():
        proc = subprocess.run(["bash", str(REPO / "launcher" / "demo.sh")], cwd=str(REPO), env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    proc = demo()

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
        assert gif.n_frames == 9 and gif.size == (SIZE, SIZE)
    with av.open(str(out / "samples" / "heldout.mp4")) as mp4:
        assert sum(1 for _ in mp4.decode(video=0)) == 9
    assert f"--logdir {out}/tensorboard" in proc.stdout
    assert f"{out}/samples/heldout.gif" in proc.stdout

    # The evaluation: the report's documented fields, one picture row per pair, the pictures in TensorBoard.
    report = json.loads((out / "eval.json").read_text())
    assert set(report) == set(REPORT_FIELDS) and report["pairs"] == 2 and report["step"] == 4
    assert sorted(report["ablations"]) == sorted(ABLATIONS)
    for summary in [report, *report["ablations"].values()]:
        assert set(SUMMARY_FIELDS) <= set(summary) and len(summary["per_pair"]) == 2
        assert all(set(r) == set(PAIR_FIELDS) for r in summary["per_pair"])
    assert report["sampler"]["steps"] == 2
    swapped = report["ablations"]["swap_caption"]["per_pair"]
    assert [r["direction"] for r in swapped] != [r["direction"] for r in report["per_pair"]]
    with Image.open(out / "eval.png") as png:
        assert png.size[1] == 2 * SIZE + 4 and png.size[0] > 2 * 9 * SIZE
    assert all((out / f"eval-{a}.png").is_file() for a in ABLATIONS)
    acc.Reload()
    assert {"evaluation/pairs", *(f"evaluation/{a}" for a in ABLATIONS)} <= set(acc.Tags()["images"])
    # The demo ends with the two figures and the picture; the bench record holds them with every stage's time.
    last = proc.stdout.strip().splitlines()
    assert last[-1].startswith(f"picture: {out}/eval.png")
    assert f"first-frame fidelity {report['first_frame_fidelity']:.0%}" in "\n".join(last[-4:])
    record = json.loads(quality.read_text())
    assert list(record["stages"]) == STAGES and not any(s["kept"] for s in record["stages"].values())
    assert record["first_frame_fidelity"] == report["first_frame_fidelity"] and record["commit"]

    # A rerun keeps what is finished: no refit, no retraining, no new samples or evaluation.
    before = {p: p.stat().st_mtime_ns for p in [out / "eval.json", out / "samples" / "heldout.gif",
                                               out / "vae" / "config.json", out / "checkpoints" / "latest"]}
    demo()
    assert {p: p.stat().st_mtime_ns for p in before} == before
    kept = {name for name, s in json.loads(quality.read_text())["stages"].items() if s["kept"]}
    assert kept == {"vae", "train", "sample", "evaluate"}
