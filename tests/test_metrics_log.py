"""metrics.jsonl holds each logged step once, in order, across kills and resumes (i2v/train/telemetry.py)."""

import json
import sys

from latent_shards import make_latent_shards
from runs import ENV, train

# Small and quick: one process, two-sample micro-batches, a checkpoint every 3 steps.
TINY = ("train.max_steps=7", "train.log_every=1", "checkpoint.every_steps=3", "train.micro_batch_size=2",
        "deepspeed.zero_stage=0")


def test_killed_run_resumed_logs_each_step_once_in_order(tmp_path):
    shards, out = tmp_path / "latents", tmp_path / "run"
    make_latent_shards(shards, shards=2, per_shard=4)
    metrics = out / "metrics.jsonl"

    # Killed hard (no cleanup) in the middle of step 6: steps 1-5 are logged, the last commit is step 3.
    r = train([sys.executable], out, shards, *TINY, env={**ENV, "I2V_FAULT": "0:5:after_backward:exit"})
    assert r.returncode == 99, r.stdout[-3000:] + r.stderr[-3000:]
    assert (out / "checkpoints" / "latest").read_text() == "step-00000003"
    lines = metrics.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5]
    # A kill in the middle of writing a record leaves half a line behind.
    with open(metrics, "a") as f:
        f.write('{"step": 6, "loss": 0.4')

    r = train([sys.executable], out, shards, *TINY)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from step-00000003" in r.stdout
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [rec["step"] for rec in records] == list(range(1, 8))
    # The records up to the checkpoint are the first run's, unchanged.
    assert metrics.read_text().splitlines()[:3] == lines[:3]
    assert ("metrics.jsonl: dropped 2 record(s) of steps after 3 (they are trained and logged again) "
            "and 1 unreadable line (a write cut short)") in r.stdout


def test_trim_keeps_the_last_record_of_each_step_in_order_and_leaves_a_clean_file_alone(tmp_path):
    from i2v.train.telemetry import trim_metrics

    path = tmp_path / "metrics.jsonl"
    assert trim_metrics(str(path), 3) == (0, 0, 0) and not path.exists()
    rec = lambda step, run: json.dumps({"step": step, "run": run}) + "\n"  # noqa: E731
    # As an unfixed trainer left it: run a logged 1-3 and was killed writing 4; run b resumed at 1,
    # appended right after the half line, logged 2-4 and was killed; a third run resumes at step 3.
    path.write_text(rec(1, "a") + rec(2, "a") + rec(3, "a") + '{"step": 4, "ru' + rec(2, "b") + rec(3, "b")
                    + rec(4, "b") + '{"step": 5')
    assert trim_metrics(str(path), 3) == (1, 1, 2)
    # Run b's step 2 went into the half line, so run a's stays; its step 3 replaces run a's.
    assert path.read_text() == rec(1, "a") + rec(2, "a") + rec(3, "b")
    inode = path.stat().st_ino
    assert trim_metrics(str(path), 3) == (0, 0, 0)
    assert path.stat().st_ino == inode  # nothing to drop: not rewritten
    assert trim_metrics(str(path), 0) == (3, 0, 0) and path.read_text() == ""  # a run that starts over
