"""Starting the runs the tests make and reading what they leave behind, shared by the test files.

- training: `train` runs launcher/train.py on configs/tiny.yaml; `losses` reads its metrics.jsonl;
  `launch_in_process` runs a launcher's refusal of a user error without a new interpreter;
  `spawn_ranks` starts ranks by hand with the rendezvous variables set; `with_fault` injects a fault
  (I2V_FAULT, see i2v/core/faults.py); `subprocess_env` is a clean environment for a launcher.
- validation: first-frame images, the `validation.pairs` override naming them, a run's TensorBoard
  events and the GIFs each pair samples from a checkpoint, for comparing with what the run logged.
- precompute: the offline job's config and launcher, and reading its latent shards.
- models: architectures the cost-model tests build.

The `shards` fixture (latent shards for the training runs) lives in tests/conftest.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import runpy
import subprocess
import sys
import tarfile

import numpy as np
from PIL import Image

from conftest import REPO
from i2v.core.distributed import free_port

# --------------------------------------------------------------------------- training runs

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def subprocess_env(**extra) -> dict:
    """This process's environment with one OpenMP thread and `extra` set, for a launcher a test starts;
    the rendezvous variables are dropped so that the launcher never inherits a rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    for k in RENDEZVOUS:
        env.pop(k, None)
    return env


def train(cmd_prefix, out, shards, *overrides, env=None, timeout=600) -> subprocess.CompletedProcess:
    """launcher/train.py on configs/tiny.yaml under `cmd_prefix` (e.g. [sys.executable] or TORCHRUN)."""
    cmd = [*cmd_prefix, "launcher/train.py", "--config", "configs/tiny.yaml", f"run.output_dir={out}",
           f"data.latent_shards={shards}", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env or ENV, capture_output=True, text=True, timeout=timeout)


def launch_in_process(args, cwd=REPO) -> subprocess.CompletedProcess:
    """`args` = [python, launcher/X.py, flags...] run in this process as `python` would run it (as __main__,
    with that argv and working directory), its output and exit code captured.

    For user errors that a launcher refuses before it builds a model or a process group: the same code and
    the same one-line message, without the ~10 s a new interpreter spends importing torch and diffusers."""
    out, err = io.StringIO(), io.StringIO()
    argv, here = sys.argv, os.getcwd()
    sys.argv = [str(a) for a in args[1:]]
    os.chdir(cwd)
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.argv = argv
        os.chdir(here)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def losses(out):
    """The losses of a run in step order, and its metrics records by step."""
    by_step = {}
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            by_step[r["step"]] = r  # a resumed run re-logs steps after its checkpoint: keep the last
    return [by_step[s]["loss"] for s in sorted(by_step)], by_step


def with_fault(spec):
    return {**ENV, "I2V_FAULT": spec}


def spawn_ranks(args, world=2, env=None, cwds=None, logs=None):
    """`world` processes of `args` with the rendezvous variables set; `cwds[r]` is rank r's directory.

    `logs[r]`: a file for rank r's stdout and stderr, for chatty runs (two ranks writing to pipes that
    are drained one after the other can fill one and block it)."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        e = {**(env or ENV), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        cwd = cwds[rank] if cwds else REPO
        out = open(logs[rank], "w") if logs else subprocess.PIPE
        procs.append(subprocess.Popen(args, cwd=cwd, env=e, stdout=out, stderr=subprocess.STDOUT if logs else out,
                                      text=True))
    return procs


# --------------------------------------------------------------------------- validation

PROMPTS = ["a red ball moving left", "a green square moving up", "a blue disk"]


def validation_images(directory, n):
    """`n` distinct first-frame PNGs in `directory` (at most len(PROMPTS) of them get a prompt)."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i in range(n):
        a = np.full((48, 80, 3), 40, np.uint8)  # not the training size: the pipeline's resize applies
        a[..., i % 3] = 220
        a[10:30, 8 + 16 * i: 32 + 16 * i] = 255
        paths.append(os.path.join(directory, f"first-frame-{i}.png"))
        Image.fromarray(a).save(paths[-1])
    return paths


def pairs_override(paths):
    items = ", ".join(f"{{image: '{p}', prompt: '{t}'}}" for p, t in zip(paths, PROMPTS))
    return f"validation.pairs=[{items}]"


def tensorboard_events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(os.path.join(run, "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    return ea


def reference_gifs(run, step, weights="live") -> dict[int, bytes]:
    """Each pair sampled here from the consolidated checkpoint of `step` (or its EMA), as a GIF."""
    import torch

    from i2v.checkpoint.reader import load_trained_transformer
    from i2v.config import load_config
    from i2v.core.distributed import DistEnv
    from i2v.model.transformer import set_attention
    from i2v.sample.sampling import sample_video
    from i2v.sample.tb_video import gif_bytes
    from i2v.sample.validation import Validator, _pair_seed

    cfg = load_config(os.path.join(run, "config.yaml"))
    val = Validator(cfg, DistEnv(0, 1, 0, torch.device("cpu")))
    model = load_trained_transformer(cfg, os.path.join(run, "checkpoints", f"step-{step:08d}"), weights)
    set_attention(model, cfg.kernels.attention)
    out = {}
    for p in val.mine:
        frames = sample_video(model, val.vae, val.scheduler, p["pixels"], p["embeds"], val.negative, val.num_frames,
                              cfg.validation.num_inference_steps, cfg.validation.guidance_scale,
                              torch.Generator().manual_seed(_pair_seed(cfg.run.seed, p["index"])),
                              ofs=val.ofs)
        out[p["index"]] = gif_bytes(frames, val.fps)
    return out


# --------------------------------------------------------------------------- precompute

PRECOMPUTE_CONFIG = str(REPO / "configs" / "tiny.yaml")
# 32x32 clips keep the VAE cheap; the encoders do not care about the DiT's sample size.
SMALL = ["data.video.height=32", "data.video.width=32"]
PRECOMPUTE_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
# Backgrounds spread over the RGB cube: the clips differ in their first frames by more than the
# random-init VAE's response to the conditioning noise, so "nearest own frame" is a fair test.
BACKGROUNDS = [(r, g, b) for r in (30, 220) for g in (30, 220) for b in (30, 220)] + [
    (128, 128, 128), (200, 100, 30), (30, 100, 200), (100, 200, 100)]


def cfg_for(video_shards, latent_shards, *extra):
    from i2v.config import load_config

    return load_config(PRECOMPUTE_CONFIG, [f"data.video_shards={video_shards}", f"data.latent_shards={latent_shards}",
                                           *SMALL, *extra])


def launch_precompute(cfg_args, env=None):
    """launcher/precompute.py on configs/tiny.yaml with `cfg_args`, `env` on top of PRECOMPUTE_ENV."""
    return subprocess.Popen([sys.executable, str(REPO / "launcher" / "precompute.py"), "--config", PRECOMPUTE_CONFIG,
                             *cfg_args], cwd=str(REPO), env={**PRECOMPUTE_ENV, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_shard(path) -> dict:
    """{key: (tensors, meta)} of one latent shard."""
    from safetensors.torch import load as st_load

    out: dict = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, _, ext = m.name.partition(".")
            data = tar.extractfile(m).read()
            entry = out.setdefault(key, [None, None])
            if ext == "latents.safetensors":
                entry[0] = st_load(data)
            else:
                entry[1] = json.loads(data)
    return out


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def tars(directory) -> dict:
    return {n: sha(os.path.join(directory, n)) for n in sorted(os.listdir(directory)) if n.endswith(".tar")}


# --------------------------------------------------------------------------- models

# A mid-size model: 4 heads x 64 (d = 256), 3 layers, wider text, 1.0-style (Conv2d patch embedding).
MID = dict(num_attention_heads=4, attention_head_dim=64, in_channels=32, out_channels=16, time_embed_dim=128,
           text_embed_dim=128, num_layers=3, sample_frames=49, sample_height=16, sample_width=24,
           max_text_seq_length=64, use_rotary_positional_embeddings=True)


def tiny_arch():
    import yaml

    with open(REPO / "configs" / "tiny.yaml") as f:
        return yaml.safe_load(f)["model"]["arch"]
