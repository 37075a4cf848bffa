"""Multi-node launches with every "node" a launcher process on this machine.

Two torchrun agents (static rendezvous: `--node_rank` decides which agent hosts which global rank,
so a test can kill a known rank; c10d: ranks in the order the agents join), and two `deepspeed`
launchers under `--no_ssh` with a two-host hostfile. The ranks talk over gloo on 127.0.0.1 as
they would across machines; the run directory and shards stand in for the shared filesystem.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import psutil
import pytest
from PIL import Image

from conftest import REPO
from i2v.core.distributed import free_port
from latent_shards import make_latent_shards
from runs import ENV, losses

# The kill test's ZeRO-2 state, written by 2 ranks, is resharded for the 1-rank resume (i2v.checkpoint.reshard);
# the global batch keeps 8 samples an optimizer step on either (micro-batch 2: accumulation 2, then 4).
KILL_RUN = ("deepspeed.zero_stage=2", "train.global_batch_size=8", "checkpoint.every_steps=2")

NODE_ENV = {**ENV, "PYTHONPATH": str(REPO)}  # the workers import this checkout, whatever the venv points at
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")
RUN_TIMEOUT = 240  # a launch that takes longer is a hang: its nodes are killed and the test fails
SURVIVOR_TIMEOUT = 120  # gloo sees a SIGKILLed peer's closed sockets at once; this only bounds a hang


def static_node(node: int, port: int) -> list[str]:
    return [*TORCHRUN, "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port)]


def c10d_node(port: int, run_id: str) -> list[str]:
    # c10d ignores --node_rank; both agents name the same endpoint and the first to bind it hosts the store
    return [*TORCHRUN, "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", run_id]


def train_args(out, shards, *overrides) -> list[str]:
    return ["launcher/train.py", "--config", "configs/tiny.yaml", f"run.output_dir={out}",
            f"data.latent_shards={shards}", "train.micro_batch_size=2", "train.log_every=1", *overrides]


def start_nodes(commands: list[list[str]], log_dir) -> list[subprocess.Popen]:
    """One launcher per command, each in its own session, logging to log_dir/node-N.log."""
    procs = []
    for node, cmd in enumerate(commands):
        log = open(os.path.join(log_dir, f"node-{node}.log"), "w")
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=NODE_ENV, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        log.close()
    return procs


def kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and everything under it. torchrun starts each worker in a session of its own,
    so killing the launcher's process group alone would leave the worker training."""
    if proc.poll() is not None:  # already reaped: its pid may belong to another process by now
        return
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    groups = set()
    for p in tree:
        try:
            groups.add(os.getpgid(p.pid))
        except ProcessLookupError:
            pass
    for g in groups:
        try:
            os.killpg(g, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def node_log(log_dir, node: int) -> str:
    with open(os.path.join(log_dir, f"node-{node}.log")) as f:
        return f.read()


def wait_nodes(procs, log_dir, timeout=RUN_TIMEOUT) -> list[int]:
    """Exit codes of every node; on a hang all nodes are killed and the test fails with their logs."""
    deadline = time.monotonic() + timeout
    codes = []
    for node, p in enumerate(procs):
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q in procs:
                kill_node(q)
            pytest.fail(f"node {node} did not finish within {timeout} s (hung rendezvous or collective?):\n"
                        + "\n".join(f"--- node {n}\n{node_log(log_dir, n)[-2000:]}" for n in range(len(procs))))
    return codes


def logs(log_dir, n=2) -> str:
    return "\n".join(f"--- node {i}\n{node_log(log_dir, i)[-3000:]}" for i in range(n))


def committed(out, step: int) -> dict:
    with open(os.path.join(out, "checkpoints", f"step-{step:08d}", "COMMITTED.json")) as f:
        return json.load(f)


def last_logged_step(out) -> int:
    """The newest step in metrics.jsonl while rank 0 may be appending to it (complete lines only)."""
    try:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            lines = [line for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return 0
    return json.loads(lines[-1])["step"] if lines else 0


def latest_step(out) -> int | None:
    path = os.path.join(out, "checkpoints", "latest")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return int(f.read().split("-")[1])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Latent shards for the tiny model and one validation first frame."""
    root = tmp_path_factory.mktemp("multinode")
    make_latent_shards(root / "latents", shards=2, per_shard=4)
    image = np.full((48, 80, 3), 40, np.uint8)
    image[10:30, 8:32] = 255
    Image.fromarray(image).save(root / "first-frame.png")
    return {"shards": root / "latents", "image": root / "first-frame.png"}


def test_two_torchrun_nodes_train_commit_and_validate(tmp_path, data):
    """Static rendezvous: node 1's agent runs global rank 1; validation runs inside the same job."""
    out = tmp_path / "run"
    port = free_port()
    args = train_args(out, data["shards"], "train.max_steps=3", "checkpoint.every_steps=3",
                      "validation.every_steps=3", "validation.num_inference_steps=2",
                      f"validation.pairs=[{{image: '{data['image']}', prompt: 'a white box'}}]")
    procs = start_nodes([static_node(n, port) + args for n in (0, 1)], tmp_path)
    assert wait_nodes(procs, tmp_path) == [0, 0], logs(tmp_path)

    log = node_log(tmp_path, 0)
    assert "2 rank(s) (2 DP)" in log
    assert (out / "checkpoints" / "latest").read_text() == "step-00000003"
    marker = committed(out, 3)
    assert marker["world_size"] == 2
    assert {"rng/rank-0.json", "rng/rank-1.json"} <= set(marker["files"])  # node 1's worker wrote its share
    _, records = losses(out)
    assert sorted(records) == [1, 2, 3]
    # one micro-batch per data-parallel rank and step: two ranks draw two global micro-batches a step
    assert [records[s]["position"] for s in (1, 2, 3)] == [2, 4, 6]
    assert "validation at step 3: 1/1 videos" in log
    video = out / "samples" / "step-00000003" / "pair-0.mp4"
    assert video.is_file() and video.stat().st_size > 0


def test_two_deepspeed_launchers_with_a_hostfile_train_and_commit(tmp_path, data):
    """DeepSpeed 0.19.8 on a CPU: the hostfile's slot counts give each node's processes (no --num_gpus,
    and the accelerator is detected as the CPU); host names must differ and are never resolved under
    --no_ssh. --master_addr is required: without it the launcher asks the first host over ssh."""
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    out = tmp_path / "run"
    port = free_port()
    args = train_args(out, data["shards"], "train.max_steps=2", "checkpoint.every_steps=2")
    procs = start_nodes([[DEEPSPEED, "--hostfile", str(hosts), "--no_ssh", "--node_rank", str(n),
                          "--master_addr", "127.0.0.1", "--master_port", str(port), *args] for n in (0, 1)], tmp_path)
    assert wait_nodes(procs, tmp_path) == [0, 0], logs(tmp_path)

    assert "2 rank(s) (2 DP)" in node_log(tmp_path, 0)
    assert (out / "checkpoints" / "latest").read_text() == "step-00000002"
    marker = committed(out, 2)
    assert marker["world_size"] == 2 and {"rng/rank-0.json", "rng/rank-1.json"} <= set(marker["files"])
    assert [r["position"] for _, r in sorted(losses(out)[1].items())] == [2, 4]


@pytest.fixture(scope="module")
def video_shards(tmp_path_factory):
    """Six synthetic clips in three video shards of two."""
    from i2v.data_prep.make_shards import make_shards
    from i2v.data.synthetic import random_spec, render, write_mp4

    root = tmp_path_factory.mktemp("videos")
    os.makedirs(root / "clips")
    rng = random.Random(0)
    for i in range(6):
        spec = random_spec(rng, 64, 64, 12)
        write_mp4(str(root / "clips" / f"c{i:02d}.mp4"), [render(spec, t, 64, 64) for t in range(12)], 8)
        (root / "clips" / f"c{i:02d}.txt").write_text(spec.caption)
    make_shards(str(root / "clips"), str(root / "shards"), 2, 1, 1, progress=False)
    return root / "shards"


def tar_keys(path, suffix) -> list[str]:
    with tarfile.open(path) as tar:
        return [m.name[: -len(suffix)] for m in tar.getmembers() if m.name.endswith(suffix)]


def test_precompute_across_two_c10d_nodes_covers_every_sample_once(tmp_path, video_shards):
    out = tmp_path / "latents"
    args = ["launcher/precompute.py", "--config", "configs/tiny.yaml", f"data.video_shards={video_shards}",
            f"data.latent_shards={out}", "data.video.height=32", "data.video.width=32"]
    port = free_port()
    procs = start_nodes([c10d_node(port, "precompute") + args for _ in (0, 1)], tmp_path)
    assert wait_nodes(procs, tmp_path) == [0, 0], logs(tmp_path)

    inputs = sorted(n for n in os.listdir(video_shards) if n.endswith(".tar"))
    expected = sorted((n, k) for n in inputs for k in tar_keys(video_shards / n, ".mp4"))
    assert len(expected) == 6
    manifest = json.loads((out / "manifest.json").read_text())
    names = [s["name"] for s in manifest["shards"]]
    assert names == [n.replace("shard-", "latents-") for n in inputs]  # each input shard once, in order
    assert manifest["samples"] == 6 and sum(s["samples"] for s in manifest["shards"]) == 6
    assert manifest["rejected"] == 0
    written = []
    for name in names:
        with tarfile.open(out / name) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    meta = json.load(tar.extractfile(m))
                    written.append((meta["source_shard"], meta["source_key"]))
    assert sorted(written) == expected  # every clip, none twice
    ranks = {n: json.loads((out / n.replace(".tar", ".json")).read_text())["rank"] for n in names}
    assert set(ranks.values()) == {0, 1}, ranks  # both nodes encoded shards


def test_killed_node_stops_the_survivor_and_one_rank_resumes(tmp_path, data):
    """SIGKILL node 1 (agent and worker) after a commit: node 0 must stop with an error rather than
    wait in a collective, and a plain one-process run continues from the last committed step."""
    out = tmp_path / "run"
    common = KILL_RUN
    port = free_port()
    procs = start_nodes([static_node(n, port) + train_args(out, data["shards"], "train.max_steps=1000", *common)
                         for n in (0, 1)], tmp_path)
    try:
        # wait for a commit with training past it
        deadline = time.monotonic() + RUN_TIMEOUT
        while True:
            assert all(p.poll() is None for p in procs), logs(tmp_path)
            assert time.monotonic() < deadline, "no checkpoint committed in time:\n" + logs(tmp_path)
            seen = latest_step(out)
            if seen is not None and last_logged_step(out) > seen:
                break
            time.sleep(0.2)
        kill_node(procs[1])
        try:
            code = procs[0].wait(timeout=SURVIVOR_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"node 0 still running {SURVIVOR_TIMEOUT} s after node 1 was killed:\n{logs(tmp_path)}")
    finally:
        for p in procs:
            kill_node(p)
    assert code != 0, logs(tmp_path)

    step = latest_step(out)  # the survivor may have committed a later one before its next collective failed
    assert step >= seen and committed(out, step)["world_size"] == 2
    r = subprocess.run([sys.executable, *train_args(out, data["shards"], f"train.max_steps={step + 2}", *common)],
                       cwd=REPO, env=NODE_ENV, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"converting {out / 'checkpoints' / f'step-{step:08d}'} (written by 2 rank(s))" in r.stdout
    assert f"resumed from step-{step:08d}: step {step}, {4 * step} global micro-batches consumed" in r.stdout
    assert "1 rank(s)" in r.stdout
    assert latest_step(out) == step + 2 and committed(out, step + 2)["world_size"] == 1
    _, records = losses(out)
    # one rank now draws all 4 global micro-batches of a step, continuing where the two stopped
    assert [records[s]["position"] for s in (step + 1, step + 2)] == [4 * step + 4, 4 * step + 8]
    assert records[step]["world_size"] == 2 and records[step + 1]["world_size"] == 1
