"""End-to-end training runs of the tiny model: one process via python, two via torchrun (gloo)."""

import os
import statistics
import sys

import pytest
import yaml

from latent_shards import SHAPE
from runs import TORCHRUN, losses, train


def assert_loss_falls(out, n=8):
    ls, _ = losses(out)
    first, last = statistics.mean(ls[:n]), statistics.mean(ls[-n:])
    assert last < 0.95 * first, f"loss did not fall: first {first:.4f}, last {last:.4f}: {ls}"


def test_single_process_python_run_trains_and_writes_everything(tmp_path, shards):
    out = tmp_path / "run"
    r = train([sys.executable], out, shards, "train.max_steps=40", "train.log_every=1", "checkpoint.every_steps=20",
              "train.peak_tflops=0.5")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert_loss_falls(out)
    _, records = losses(out)
    assert sorted(records) == list(range(1, 41))
    rec = records[40]
    for field in ("loss", "lr", "grad_norm", "samples_per_s", "tflops", "mfu", "hfu", "tokens_per_s"):
        assert isinstance(rec[field], float), field
    # The tiny model's text tokens + latent frames x (height / 2) x (width / 2) video tokens per sample
    # (patch 2); MFU against the given peak.
    tokens = SHAPE["text_len"] + SHAPE["frames"] * (SHAPE["height"] // 2) * (SHAPE["width"] // 2)
    assert rec["tokens_per_s"] == pytest.approx(tokens * rec["samples_per_s"], rel=1e-6)
    assert rec["tflops"] > 0 and rec["mfu"] == pytest.approx(rec["tflops"] / 0.5) and rec["hfu"] == rec["mfu"]
    assert "step 40/40" in r.stdout and "ETA" in r.stdout and "TFLOP/s (MFU " in r.stdout
    # TensorBoard: a real event file with the documented scalar tags
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/samples_per_s", "perf/step_time_s",
            "perf/data_wait_frac", "perf/tflops_per_s", "perf/mfu", "perf/tokens_per_s"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 41))
    assert acc.Scalars("train/loss")[-1].value == pytest.approx(rec["loss"], rel=1e-6)
    # resolved config written, and stored in the checkpoint
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["train"]["max_steps"] == 40 and resolved["data"]["latent_shards"] == str(shards)
    ckpts = sorted(os.listdir(out / "checkpoints"))
    assert "step-00000020" in ckpts and "step-00000040" in ckpts
    assert (out / "checkpoints" / "latest").read_text() == "step-00000040"


@pytest.mark.parametrize("stage", [2, 3])
def test_two_process_gloo_run_loss_falls(tmp_path, shards, stage):
    out = tmp_path / f"zero{stage}"
    r = train(TORCHRUN, out, shards, f"deepspeed.zero_stage={stage}", "train.max_steps=30", "train.log_every=1",
              "checkpoint.every_steps=0", "train.micro_batch_size=2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert_loss_falls(out)
    # two ranks, two samples each per step
    _, records = losses(out)
    assert records[30]["samples_per_s"] > 0
    # No known peak on the CPU: FLOP/s are logged, MFU is not.
    assert records[30]["tflops"] > 0 and "mfu" not in records[30]
    assert os.listdir(out / "checkpoints" / "step-00000030")


def test_bad_shard_path_is_a_clear_error(tmp_path):
    r = train([sys.executable], tmp_path / "run", tmp_path / "missing")
    assert r.returncode == 2
    assert "data.latent_shards" in r.stderr and "missing" in r.stderr and "Traceback" not in r.stderr
