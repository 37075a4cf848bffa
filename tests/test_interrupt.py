"""Ctrl-C commits: SIGINT to the whole foreground process group (what a terminal sends) under plain python,
torchrun and the deepspeed launcher; every rank agrees at the step boundary, commits and exits 130.
A second Ctrl-C stops at once, and the next launch cleans up and resumes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from i2v.core.distributed import free_port
from i2v.train.run_lock import LOCK_FILE
from runs import subprocess_env

DEEPSPEED = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")
LAUNCHERS = {
    "python": [sys.executable],
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    "deepspeed": [DEEPSPEED, "--num_gpus", "2"],
}


@pytest.fixture(scope="module")
def shards_layout():
    return dict(shards=2, per_shard=4)


def _start(launcher, out, shards, log, *extra):
    prefix = list(LAUNCHERS[launcher])
    if launcher == "deepspeed":
        prefix += ["--master_port", str(free_port())]
    cmd = [*prefix, "launcher/train.py", "--config", "configs/tiny.yaml", f"run.output_dir={out}",
           f"data.latent_shards={shards}", "train.log_every=1", "checkpoint.every_steps=0", *extra]
    # A session of its own: the test signals the whole group, as a terminal's Ctrl-C does.
    return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(PYTHONUNBUFFERED="1"), stdout=log,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for_steps(out, proc, n, timeout=300):
    deadline = time.time() + timeout
    metrics = out / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, "the run ended before it was interrupted"
        time.sleep(0.3)
    raise AssertionError(f"no {n} logged steps in {timeout} s")


def _latest(out):
    latest = out / "checkpoints" / "latest"
    return latest.read_text().strip() if latest.exists() else None


def _newest_committed(out):
    """The step a launch resumes from: the newest step with its commit marker. A second Ctrl-C may land
    after that marker and before the `latest` pointer is replaced, so `latest` can lag behind it."""
    root = out / "checkpoints"
    tags = sorted(p.name for p in root.glob("step-*") if (p / "COMMITTED.json").is_file()) if root.is_dir() else []
    return tags[-1] if tags else None


@pytest.mark.parametrize("launcher,workers", [("python", 0), ("python", 2), ("torchrun", 0), ("deepspeed", 0)])
def test_ctrl_c_commits_and_exits_130(tmp_path, shards, launcher, workers):
    """`workers`: DataLoader worker processes, which get the terminal's SIGINT too."""
    out, log_path = tmp_path / "run", tmp_path / "log.txt"
    with open(log_path, "w") as log:
        # With workers, a step of 8 micro-batches needs more than their prefetched ones after the signal.
        extra = [f"data.num_workers={workers}"] + (["train.grad_accum_steps=8"] if workers else [])
        proc = _start(launcher, out, shards, log, "train.max_steps=100000", *extra)
        _wait_for_steps(out, proc, 3)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=240)
    text = log_path.read_text()
    tag = _latest(out)
    assert tag is not None and (out / "checkpoints" / tag / "COMMITTED.json").is_file(), text[-3000:]
    step = int(tag.split("-")[1])
    assert step >= 3
    assert f"interrupted: committed checkpoint at step {step}; exiting with 130" in text, text[-3000:]
    if launcher == "python":
        assert proc.returncode == 130
    else:  # the launchers report their workers' failure their own way; what matters is the commit
        assert proc.returncode != 0
    assert not (out / LOCK_FILE).exists()
    assert not [n for n in os.listdir(out / "checkpoints") if n.startswith("tmp-")]


def test_a_second_ctrl_c_raises_at_once_and_a_first_only_asks():
    from types import SimpleNamespace

    from i2v.train.trainer import Trainer

    state = SimpleNamespace(_preempt=0)
    Trainer._on_signal(state, signal.SIGINT, None)
    assert state._preempt == signal.SIGINT  # the first: stop at the next step boundary, after a commit
    Trainer._on_signal(state, signal.SIGTERM, None)  # a launcher's SIGTERM after Ctrl-C: still the commit
    assert state._preempt == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        Trainer._on_signal(state, signal.SIGINT, None)


def test_double_ctrl_c_exits_130_and_the_next_launch_resumes(tmp_path, shards):
    out, log_path = tmp_path / "run", tmp_path / "log.txt"
    with open(log_path, "w") as log:
        proc = _start("python", out, shards, log, "train.max_steps=100000")
        _wait_for_steps(out, proc, 3)
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.05)  # two signals sent back to back may arrive as one
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=240)
    # 130 from the second KeyboardInterrupt, or from the first signal's commit when the two arrived as one.
    # A loaded machine may deliver the second only once the run has committed and Python is tearing down,
    # where the default disposition is back and SIGINT ends the process: a shell reports 130 for that too.
    assert proc.returncode in (130, -signal.SIGINT), log_path.read_text()[-3000:]
    # Whatever it left (a committed step, a half-written tmp-step-N, or nothing), the next launch goes on.
    tag = _newest_committed(out)
    target = (int(tag.split("-")[1]) if tag else 0) + 3
    with open(tmp_path / "log2.txt", "w") as log:
        again = _start("python", out, shards, log, f"train.max_steps={target}")
        again.wait(timeout=300)
    text = (tmp_path / "log2.txt").read_text()
    assert again.returncode == 0, text[-3000:]
    assert _latest(out) == f"step-{target:08d}"
    assert not [n for n in os.listdir(out / "checkpoints") if n.startswith("tmp-")]
