"""Validation videos during training: files, TensorBoard GIF summaries, ZeRO-3 across 2 ranks, deadlines.

The sampled videos are checked against an independent reference: the same pair sampled in this
process from DeepSpeed's consolidation of the checkpoint written at the validation step. The GIF
in TensorBoard must be byte-identical to the reference's GIF, which holds only if every rank
sampled with the full, correct weights and rank 0 received every rank's video.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys

import av
import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from latent_shards import make_latent_shards
from runs import pairs_override, reference_gifs, subprocess_env, tensorboard_events, validation_images

from i2v.config import load_config
from i2v.core.distributed import free_port
from i2v.core.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.yaml")
SUBPROCESS_TIMEOUT = 240


def _overrides(out, shards, images, *extra):
    return [f"run.output_dir={out}", f"data.latent_shards={shards}", "train.max_steps=2", "train.warmup_steps=0",
            "train.micro_batch_size=2", "train.log_every=1", "validation.num_inference_steps=2",
            pairs_override(images), *extra]


def _start(cmd):
    return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(PYTHONPATH=REPO), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait(p, timeout=SUBPROCESS_TIMEOUT):
    """Exit status and log, or kill the whole process group: a hung collective must not hang the tests."""
    try:
        log, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        log, _ = p.communicate()
        pytest.fail(f"run did not finish within {timeout} s (hung collective?):\n{log[-3000:]}")
    return p.returncode, log


def _gif_frames(payload: bytes) -> list[np.ndarray]:
    gif = Image.open(io.BytesIO(payload))
    assert gif.format == "GIF"
    return [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(gif)]


def _mp4_frames(path):
    with av.open(path) as f:
        frames = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
    return np.stack(frames)


# --------------------------------------------------------------------------- the GIF summary


def test_gif_summary_round_trips_through_tensorboard(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from i2v.sample.tb_video import add_video

    f, h, w = 5, 16, 24
    frames = torch.full((f, 3, h, w), -1.0)
    for t in range(f):
        frames[t, :, 4:10, 2 + 4 * t: 6 + 4 * t] = 1.0  # a white box moving right by 4 px per frame
    writer = SummaryWriter(str(tmp_path))
    add_video(writer, "validation/clip", frames, step=7, fps=4)
    writer.close()
    ea = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    ea.Reload()
    assert ea.Tags()["images"] == ["validation/clip"]
    (ev,) = ea.Images("validation/clip")
    assert (ev.step, ev.width, ev.height) == (7, w, h)
    gif = Image.open(io.BytesIO(ev.encoded_image_string))
    assert gif.is_animated and gif.n_frames == f and gif.info["duration"] == 250 and gif.info["loop"] == 0
    for t, frame in enumerate(_gif_frames(ev.encoded_image_string)):
        cols = np.nonzero(frame[..., 0].max(axis=0) > 128)[0]
        rows = np.nonzero(frame[..., 0].max(axis=1) > 128)[0]
        assert (cols.min(), cols.max(), rows.min(), rows.max()) == (2 + 4 * t, 5 + 4 * t, 4, 9)


# --------------------------------------------------------------------------- config errors


def test_validator_rejects_bad_pairs(tmp_path):
    from i2v.core.distributed import DistEnv
    from i2v.sample.validation import Validator

    env = DistEnv(0, 1, 0, torch.device("cpu"))
    (good,) = validation_images(str(tmp_path), 1)
    base = [f"run.output_dir={tmp_path}", "validation.every_steps=5"]
    with pytest.raises(ConfigError, match=r"validation\.pairs: empty, but validation\.every_steps is 5"):
        Validator(load_config(TINY, base), env)
    missing = tmp_path / "missing.png"
    cfg = load_config(TINY, base + [pairs_override([good, str(missing)])])
    with pytest.raises(ConfigError, match=rf"validation\.pairs\[1\]\.image: file not found: {missing}"):
        Validator(cfg, env)
    # The pairs' form and the clip length fail when the config is loaded, before any model is built.
    with pytest.raises(ConfigError, match=r"validation\.pairs\[0\]: expected a mapping with exactly the keys"):
        load_config(TINY, base + [f"validation.pairs=[{{image: '{good}', text: hi}}]"])
    with pytest.raises(ConfigError, match=r"validation\.num_frames: is 8"):
        load_config(TINY, base + [pairs_override([good]), "validation.num_frames=8"])


# --------------------------------------------------------------------------- training runs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    shards = str(root / "latents")
    make_latent_shards(shards, shards=2, per_shard=4)
    return root, shards, validation_images(str(root / "images"), 3)


def test_single_process_run_writes_mp4_and_gif_summaries(data):
    root, shards, images = data
    train = [sys.executable, os.path.join(REPO, "launcher", "train.py"), "--config", TINY]
    a, b = str(root / "with_videos"), str(root / "timed_out")
    jobs = [_start(train + _overrides(a, shards, images[:2], "validation.every_steps=1")),
            _start(train + _overrides(b, shards, images[:2], "validation.every_steps=1", "validation.timeout_s=0"))]
    (rc_a, log_a), (rc_b, log_b) = [_wait(j) for j in jobs]
    assert rc_a == 0, log_a[-3000:]
    assert rc_b == 0, log_b[-3000:]

    # Files: one mp4 per pair and step, 9 frames at the training size.
    for step in (1, 2):
        d = os.path.join(a, "samples", f"step-{step:08d}")
        assert sorted(os.listdir(d)) == ["pair-0.mp4", "pair-1.mp4"]
        for name in os.listdir(d):
            assert _mp4_frames(os.path.join(d, name)).shape == (9, 64, 64, 3)
    # TensorBoard: an animated GIF per pair and step, the same pixels as a reference sample.
    ea = tensorboard_events(a)
    assert sorted(ea.Tags()["images"]) == ["validation/pair-0", "validation/pair-1"]
    reference = reference_gifs(a, 2)
    for i in (0, 1):
        events = ea.Images(f"validation/pair-{i}")
        assert [e.step for e in events] == [1, 2]
        assert len(_gif_frames(events[-1].encoded_image_string)) == 9
        assert events[-1].encoded_image_string == reference[i]
    assert [e.value for e in ea.Scalars("validation/completed_pairs")] == [2, 2]
    assert "validation at step 2: 2/2 videos" in log_a

    # A zero budget: every pair is abandoned at its first forward, nothing is written, training goes on.
    assert "validation at step 1: 0/2 videos" in log_b and "skipped: validation.timeout_s reached" in log_b
    assert not os.path.exists(os.path.join(b, "samples", "step-00000001", "pair-0.mp4"))
    assert tensorboard_events(b).Tags()["images"] == []
    # Sampling leaves training untouched: the same losses with and without videos.
    losses = [[json.loads(line)["loss"] for line in open(os.path.join(r, "metrics.jsonl"))] for r in (a, b)]
    assert len(losses[0]) == 2 and losses[0] == losses[1]


def test_two_process_zero3_three_pairs_finishes(data):
    """Rank 0 samples pairs 0 and 2, rank 1 only pair 1: the uneven split must not hang under ZeRO-3."""
    root, shards, images = data
    out = str(root / "zero3_2proc")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(REPO, "launcher", "train.py"), "--config", TINY,
           *_overrides(out, shards, images, "deepspeed.zero_stage=3", "validation.every_steps=2")]
    rc, log = _wait(_start(cmd))
    assert rc == 0, log[-3000:]
    marker = json.load(open(os.path.join(out, "checkpoints", "step-00000002", "COMMITTED.json")))
    assert marker["world_size"] == 2
    assert any("optim_states" in f for f in marker["files"])
    d = os.path.join(out, "samples", "step-00000002")
    assert sorted(os.listdir(d)) == ["pair-0.mp4", "pair-1.mp4", "pair-2.mp4"]
    assert "validation at step 2: 3/3 videos" in log
    ea = tensorboard_events(out)
    reference = reference_gifs(out, 2)
    for i in range(3):
        (ev,) = ea.Images(f"validation/pair-{i}")
        assert ev.encoded_image_string == reference[i], f"pair {i} differs from the consolidated checkpoint's sample"
