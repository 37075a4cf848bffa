"""One run per output folder: a live run's lock refuses a second launch, a stale one is taken over,
and of several launches racing for a stale lock exactly one wins."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO
from i2v.train.run_lock import LOCK_FILE, RunLock, RunLocked
from latent_shards import make_latent_shards


def _write_lock(directory, **fields):
    os.makedirs(directory, exist_ok=True)
    record = {"host": "node-7", "pid": 4242, "token": "theirs", "started": time.time() - 50,
              "heartbeat": time.time(), **fields}
    (directory / LOCK_FILE).write_text(json.dumps(record))


def test_live_lock_is_refused_naming_its_holder(tmp_path):
    _write_lock(tmp_path)
    with pytest.raises(RunLocked, match=r"in use by the run of host node-7 pid 4242 .*run\.lock_timeout_s"):
        RunLock.acquire(str(tmp_path), timeout_s=60)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == "theirs"  # untouched


def test_stale_heartbeat_or_dead_local_process_is_taken_over(tmp_path):
    logs = []
    _write_lock(tmp_path, heartbeat=time.time() - 600)
    lock = RunLock.acquire(str(tmp_path), timeout_s=60, log=logs.append)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == lock.token
    assert "took over the lock of host node-7 pid 4242" in logs[0] and "no heartbeat for 600 s" in logs[0]
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path, host=socket.gethostname(), pid=dead.pid)  # a fresh heartbeat, but its process is gone
    lock = RunLock.acquire(str(tmp_path), timeout_s=60, log=logs.append)
    assert f"its process {dead.pid} on this host is gone" in logs[1]
    lock.release()


def test_heartbeat_advances_and_a_lost_lock_stops_writes(tmp_path):
    logs = []
    lock = RunLock.acquire(str(tmp_path / "run"), timeout_s=2, log=logs.append)  # beats every 0.5 s
    first = json.loads((tmp_path / "run" / LOCK_FILE).read_text())["heartbeat"]
    deadline = time.time() + 30  # a beat every 0.5 s, late on a loaded machine
    while json.loads((tmp_path / "run" / LOCK_FILE).read_text())["heartbeat"] == first and time.time() < deadline:
        time.sleep(0.1)
    assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["heartbeat"] > first
    lock.check()  # still ours
    _write_lock(tmp_path / "run")  # another run judged this one stale and took the folder
    # The next heartbeat (0.5 s) sees it; a loaded machine may run the heartbeat thread late, so wait up to 30 s.
    deadline = time.time() + 30
    while not lock.lost and time.time() < deadline:
        time.sleep(0.1)
    with pytest.raises(RunLocked, match="taken over by host node-7 pid 4242"):
        lock.check()
    lock.release()
    assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["token"] == "theirs"  # not ours to remove


def _contend(directory, barrier, results):
    barrier.wait()
    try:
        lock = RunLock.acquire(directory, timeout_s=60, log=lambda m: None)
    except RunLocked:
        results.put("refused")
        return
    results.put("won")
    time.sleep(5)  # hold it while the others look (a loaded machine may start one late)
    lock.release()


def test_racing_launches_for_a_stale_lock_have_one_winner(tmp_path):
    _write_lock(tmp_path, heartbeat=time.time() - 600)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(str(tmp_path), barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    assert outcomes == ["refused", "refused", "refused", "won"]
    assert not any(n.startswith(LOCK_FILE + ".") for n in os.listdir(tmp_path))  # no stale copies left behind


def test_a_second_launch_into_a_live_run_exits_2(tmp_path):
    shards = tmp_path / "latents"
    make_latent_shards(shards, shards=2, per_shard=4)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "launcher/train.py", "--config", "configs/tiny.yaml", f"run.output_dir={out}",
           f"data.latent_shards={shards}", "train.max_steps=100000", "train.log_every=1", "checkpoint.every_steps=0"]
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (out / "metrics.jsonl").exists():
            time.sleep(0.5)
        second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"pid {first.pid}" in second.stderr and "is in use by the run of host" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=240)
    assert first.returncode == 143
    assert not (out / LOCK_FILE).exists()  # released on the way out
