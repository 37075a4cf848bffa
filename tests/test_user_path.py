"""The README's user path, end to end on real (synthetic) clips: make_shards -> precompute -> LoRA training on
two ranks with an EMA and validation videos -> export of the EMA -> diffusers. One VAE from the latents onward,
and an export that samples in diffusers as i2v does."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from random_vae import RANDOM_VAE
from runs import subprocess_env

TINY = str(REPO / "configs" / "tiny.yaml")
TINY_VAE = str(REPO / "configs" / "tiny-vae")
STEPS = 40
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# docs/lora-ema.md's LoRA line for the tiny model, with an EMA; the random-init base's zero output layer trains in full.
LORA = ["model.lora.rank=4", "model.lora.extra_trainable=[proj_out]", "train.ema.decay=0.9", "train.lr=5e-3"]


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=subprocess_env(PYTHONUNBUFFERED="1"),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    """{dir, latents, run, export, image, prompt}: the README's path taken once, with nothing but the config."""
    root = tmp_path_factory.mktemp("user_path")
    r = _run("-m", "i2v.data.synthetic", "--output", str(root / "clips"), "--clips", "24", "--seed", "5",
             "--frames", "9", "--height", "64", "--width", "64", "--heldout", str(root / "heldout"))
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run("launcher/make_shards.py", "--input", str(root / "clips"), "--output", str(root / "shards"),
             "--samples-per-shard", "12")
    assert r.returncode == 0, r.stderr[-2000:]
    common = [f"data.video_shards={root / 'shards'}", f"data.latent_shards={root / 'latents'}"]
    r = _run("launcher/precompute.py", "--config", TINY, *common)
    assert r.returncode == 0, r.stderr[-2000:]
    prompt = (root / "heldout" / "heldout.txt").read_text().strip()
    pairs = json.dumps([{"image": str(root / "heldout" / "heldout.png"), "prompt": prompt}])
    r = _run(*TORCHRUN, "launcher/train.py", "--config", TINY, *common, *LORA, f"run.output_dir={root / 'run'}",
             f"train.max_steps={STEPS}", "train.log_every=10", "checkpoint.every_steps=0",
             f"validation.every_steps={STEPS}", f"validation.pairs={pairs}", "validation.num_inference_steps=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "precompute.vae: " in r.stdout and "manifest.json" in r.stdout, r.stdout[-2000:]
    r = _run("launcher/export.py", "--config", str(root / "run" / "config.yaml"), "--weights", "ema",
             "--checkpoint", str(root / "run" / "checkpoints"), "--out", str(root / "export"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "max_sequence_length=8" in r.stdout and "load_lora_weights" in r.stdout, r.stdout
    return {"dir": root, "latents": root / "latents", "run": root / "run", "export": root / "export",
            "image": root / "heldout" / "heldout.png", "prompt": prompt, "common": common}


def test_training_validation_and_export_use_the_vae_that_made_the_latents(path):
    import yaml
    from diffusers import AutoencoderKLCogVideoX

    from i2v.checkpoint.commit import saved_client_state

    manifest = json.loads((path["latents"] / "manifest.json").read_text())
    assert manifest["vae"]["source"] == "pretrained" and manifest["vae"]["path"] == TINY_VAE
    run_cfg = yaml.safe_load((path["run"] / "config.yaml").read_text())
    assert run_cfg["precompute"]["vae"]["pretrained"] == TINY_VAE and run_cfg["precompute"]["vae"]["arch"] == {}
    state = saved_client_state(str(path["run"] / "checkpoints" / f"step-{STEPS:08d}"))
    assert state["encoders"]["vae"]["files_sha256"] == manifest["vae"]["files_sha256"]
    assert state["encoders"]["text_encoder"]["seed"] == manifest["text_encoder"]["seed"]
    exported = AutoencoderKLCogVideoX.from_pretrained(str(path["export"] / "vae")).state_dict()
    original = AutoencoderKLCogVideoX.from_pretrained(TINY_VAE).state_dict()
    assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in original)
    assert (path["run"] / "samples" / f"step-{STEPS:08d}" / "pair-0.mp4").is_file()  # validation decoded with it
    readme = (path["export"] / "README.md").read_text()
    assert "max_sequence_length=8" in readme and "num_frames=9" in readme and "height=64" in readme
    assert f"step {STEPS}" in readme and str(path["run"]) in readme


def test_a_run_naming_another_vae_is_refused_before_any_process_group(path, tmp_path):
    out = tmp_path / "other"
    r = _run("launcher/train.py", "--config", TINY, *path["common"], f"run.output_dir={out}", *RANDOM_VAE,
             "train.max_steps=2")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "an inline arch" in r.stderr and TINY_VAE in r.stderr and "manifest.json" in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()  # nothing written, not even an empty folder
    # Sampling and export with another VAE are refused the same way, naming the checkpoint's.
    r = _run("launcher/export.py", "--config", str(path["run"] / "config.yaml"), *RANDOM_VAE,
             "--checkpoint", str(path["run"] / "checkpoints"), "--out", str(tmp_path / "export"))
    assert r.returncode == 2 and TINY_VAE in r.stderr and "an inline arch" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "export").exists()


def test_a_finished_run_says_so_without_building_the_engine(path):
    r = _run("launcher/train.py", "--config", TINY, *path["common"], *LORA, f"run.output_dir={path['run']}",
             f"train.max_steps={STEPS}", timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"already finished: its newest checkpoint is step {STEPS}" in r.stdout
    assert "parameters" not in r.stdout  # the trainer's first line: no model, no engine was built


def test_export_samples_in_diffusers_as_i2v_samples(path):
    """The pipeline, loaded from the export and called as its README.md says, draws i2v's frames."""
    from diffusers import CogVideoXImageToVideoPipeline

    from i2v.config import load_config
    from i2v.sample.export import pipeline_call
    from i2v.data.frames import load_first_frame
    from i2v.sample.sampling import sample_from_checkpoint

    cfg = load_config(str(path["run"] / "config.yaml"), ["validation.num_inference_steps=10",
                                                         "validation.guidance_scale=3.0"])
    call = pipeline_call(cfg)
    image = load_first_frame(str(path["image"]), call["height"], call["width"], "--image")
    ours = sample_from_checkpoint(cfg, str(path["run"] / "checkpoints" / f"step-{STEPS:08d}"), image, path["prompt"],
                                  num_frames=call["num_frames"], num_inference_steps=call["num_inference_steps"],
                                  guidance_scale=call["guidance_scale"], seed=0, weights="ema")
    ours = (ours.float() + 1) / 2  # [F, 3, H, W] in [0, 1]

    pipe = CogVideoXImageToVideoPipeline.from_pretrained(str(path["export"]))
    pipe.load_lora_weights(str(path["export"]))
    pipe.set_progress_bar_config(disable=True)
    pil = Image.open(path["image"]).convert("RGB")
    theirs = pipe(image=pil, prompt=path["prompt"], **call, use_dynamic_cfg=False, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).frames[0].float()  # [F, 3, H, W] in [0, 1]
    assert theirs.shape == ours.shape
    per_frame = (theirs - ours).abs().mean(dim=(1, 2, 3))
    assert per_frame.max() <= 0.01, per_frame.tolist()
    # The trained model does something: its clip is not the first frame repeated.
    first = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255
    assert (ours[-1] - first).abs().mean() > 0.01
