"""A 2-rank training run over HTTP shards, with a drop in the middle of a shard, trains every sample of
the epoch exactly once and logs the losses of the same run over the local files, in stream order and in
the global order; in the global order it also resumes on one rank and follows the uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading

import pytest

from i2v.data import latent_order
from latent_shards import make_latent_shards
from remote_servers import FaultyHTTPServer
from runs import TORCHRUN, losses, train

# 4 shards x 8 samples; 2 ranks x micro-batch 2 x 8 steps = 32 samples: one epoch (in stream order, each rank
# reading its 2 shards; in the global order, 16 global micro-batches read by byte ranges).
COMMON = ("data.resampled=false", "data.shuffle_buffer=0", "data.log_keys=true",
          "data.remote.backoff_s=0.05", "data.remote.timeout_s=5", "train.micro_batch_size=2", "train.max_steps=8",
          "train.log_every=1", "checkpoint.every_steps=0", "checkpoint.save_at_end=false", "run.deterministic=true")


def stopped_at_step_4(run, copy) -> None:
    """A copy of the finished `run` as it was when step 4 had just been committed (metrics and key logs too)."""
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "step-00000008")
    (copy / "checkpoints" / "latest").write_text("step-00000004")
    for name in ("metrics.jsonl", "keys-rank0.jsonl", "keys-rank1.jsonl"):
        with open(copy / name) as f:
            kept = [line for line in f if json.loads(line)["step"] <= 4]
        (copy / name).write_text("".join(kept))


def trained_keys(out) -> dict:
    """{key: [(rank, step, epoch), ...]} from each rank's keys-rank<R>.jsonl (data.log_keys)."""
    seen: dict = {}
    for rank in (0, 1):
        with open(os.path.join(out, f"keys-rank{rank}.jsonl")) as f:
            for line in f:
                r = json.loads(line)
                for k, e in zip(r["keys"], r["epochs"]):
                    seen.setdefault(k, []).append((rank, r["step"], e))
    return seen


@pytest.mark.parametrize("order", ["stream", "global"])
def test_two_ranks_over_http_with_a_drop_train_each_sample_once_and_match_local(tmp_path, order):
    root = tmp_path / "served"
    paths = make_latent_shards(root / "latents", shards=4, per_shard=8)
    if order == "global":  # the sample offsets precompute records
        shards = [{"name": os.path.basename(p), "index": latent_order.shard_index(p)} for p in paths]
        (root / "latents" / "manifest.json").write_text(json.dumps({"shards": shards}))
    local = tmp_path / "local"
    results = {}
    args = (*COMMON, f"data.order={order}")
    if order == "global":  # a checkpoint at step 4 to resume from on one rank
        args += ("checkpoint.every_steps=4", "train.global_batch_size=4")

    def local_run():  # the reference, in parallel with the HTTP run (each is mostly startup)
        results["local"] = train(TORCHRUN, local, root / "latents", *args)

    with FaultyHTTPServer(root) as server:
        shard = root / "latents" / "latents-000001.tar"  # rank 1's first shard (stream order)
        cut = os.path.getsize(shard) // 2 + 777 if order == "stream" else 5000  # global: inside one range read
        server.add_fault("/latents/latents-000001.tar", "drop", cut)
        thread = threading.Thread(target=local_run)
        thread.start()
        out = tmp_path / "http"
        url = server.url + "/latents/latents-{000000..000003}.tar"
        r = train(TORCHRUN, out, url, *args)
        thread.join()
        if order == "global" and r.returncode == 0:
            # The run as it was when step 4 was committed, resumed on one rank over HTTP.
            resumed = tmp_path / "resumed"
            stopped_at_step_4(out, resumed)
            r1 = train([sys.executable], resumed, url, *args)
            assert r1.returncode == 0, r1.stdout[-3000:] + r1.stderr[-3000:]
            assert "resumed from step-00000004" in r1.stdout
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ref = results["local"]
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    if order == "stream":
        assert ("/latents/latents-000001.tar", f"bytes={cut}-") in server.requests

    seen = trained_keys(out)
    assert sorted(seen) == [f"sample{i:05d}" for i in range(32)]
    repeated = {k: v for k, v in seen.items() if len(v) != 1}
    assert not repeated, f"trained more than once: {repeated}"
    assert all(e == 0 for v in seen.values() for _, _, e in v)
    assert trained_keys(local) == seen  # the same samples on the same rank at the same step

    http_losses, records = losses(out)
    local_losses, local_records = losses(local)
    assert len(http_losses) == 8
    assert all(abs(a - b) <= 1e-6 * abs(b) for a, b in zip(http_losses, local_losses)), (http_losses, local_losses)
    assert records[8]["remote_retries"] == 1 and local_records[8]["remote_retries"] == 0
    assert records[8]["bad_samples"] == 0

    if order == "global":  # at another world size, steps 5-8 follow the uninterrupted run, on the same samples
        resumed_losses, _ = losses(resumed)
        assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(resumed_losses[4:], http_losses[4:])), \
            (resumed_losses, http_losses)
        again = {}
        for rank in (0, 1):
            with open(resumed / f"keys-rank{rank}.jsonl") as f:
                for line in f:
                    rec = json.loads(line)
                    again.setdefault(rec["step"], []).extend(rec["keys"])
        assert sorted(k for ks in again.values() for k in ks) == [f"sample{i:05d}" for i in range(32)]
        assert {s: sorted(ks) for s, ks in again.items()} == {
            s: sorted(k for k, v in seen.items() for _, step, _ in v if step == s) for s in range(1, 9)}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("data/remote_retries")][-1] == 1
