"""A 2-rank training run over HTTP shards, with a drop in the middle of a shard, trains every sample of
the epoch exactly once and logs the losses of the same run over the local files (stream order)."""

from __future__ import annotations

import json
import os
import threading

import pytest

from i2v.data import latent_order
from test_train import TORCHRUN, losses, train
from latent_shards import make_latent_shards
from remote_servers import FaultyHTTPServer

# 4 shards x 8 samples; 2 ranks x micro-batch 2 x 8 steps = 32 samples: one epoch (in stream order, each rank
# reading its 2 shards; in the global order, 16 global micro-batches read by byte ranges).
COMMON = ("data.resampled=false", "data.shuffle_buffer=0", "data.log_keys=true",
          "data.remote.backoff_s=0.05", "data.remote.timeout_s=5", "train.micro_batch_size=2", "train.max_steps=8",
          "train.log_every=1", "checkpoint.every_steps=0", "checkpoint.save_at_end=false", "run.deterministic=true")


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

    def local_run():  # the reference, in parallel with the HTTP run (each is mostly startup)
        results["local"] = train(TORCHRUN, local, root / "latents", *args)

    with FaultyHTTPServer(root) as server:
        shard = root / "latents" / "latents-000001.tar"  # rank 1's first shard (stream order)
        cut = os.path.getsize(shard) // 2 + 777 if order == "stream" else 5000  # global: inside one range read
        server.add_fault("/latents/latents-000001.tar", "drop", cut)
        thread = threading.Thread(target=local_run)
        thread.start()
        out = tmp_path / "http"
        r = train(TORCHRUN, out, server.url + "/latents/latents-{000000..000003}.tar", *args)
        thread.join()
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

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("data/remote_retries")][-1] == 1
