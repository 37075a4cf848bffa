"""Shards from real servers on 127.0.0.1 (an in-test HTTP server with faults, moto's S3 server): a drop
mid-shard resumes by byte range and loses or repeats no sample, 503s and stalls are retried within
data.remote.retries and data.remote.timeout_s, and a missing shard is counted and named."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time

import pytest
import torch

from i2v.config import RemoteConfig
from i2v.data import latent_order, remote
from i2v.data.latents import LatentDataset, load_empty_prompt, make_loader
from i2v.core import seeding
from i2v.data.shards import expand_shards
from i2v.core.errors import DataError
from latent_shards import make_latent_shards
from remote_servers import FaultyHTTPServer, moto_s3

SHARDS, PER_SHARD = 4, 6
PATTERN = "/latents/latents-{000000..000003}.tar"
FAST = RemoteConfig(retries=3, timeout_s=2.0, backoff_s=0.01)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A folder served over HTTP: latents/ with 4 shards of 6 samples and the empty prompt."""
    d = tmp_path_factory.mktemp("served")
    make_latent_shards(d / "latents", shards=SHARDS, per_shard=PER_SHARD)
    return d


def all_keys():
    return sorted(f"sample{i:05d}" for i in range(SHARDS * PER_SHARD))


def epoch(spec, cfg=FAST, **kw):
    """One pass over every shard in stream order, batch size 1: (samples by key, last batch's counts)."""
    kw = {"batch_size": 1, "shuffle_buffer": 0, "resampled": False, "max_bad_fraction": 0.5, **kw}
    ds = LatentDataset(spec, order="stream", remote_cfg=cfg, **kw)
    seen = []
    for b in make_loader(ds, 0):
        if b["epochs"][0] > 0:
            # A shard's counts travel with the next batch: this one's hold all of epoch 0 and
            # epoch 1's first shard (see bad_in_epoch0).
            return seen, b["bad"]
        seen.append((b["keys"][0], b["video_latents"][0]))
    raise AssertionError("the stream ended")


def bad_in_epoch0(bad, spec, url, reason):
    """bad["by_reason"] less epoch 1's first shard, if that is `url` (stream order, seed 0, one rank, no workers)."""
    counts = dict(bad["by_reason"])
    if seeding.shuffled(expand_shards(spec, "x"), "shard-order", 0, 1, 0, 0)[0] == url:
        counts[reason] -= 1
    return counts


def local_samples(root):
    seen, _ = epoch(str(root / "latents"))
    return dict(seen)


def shard_size(root, i=1):
    return os.path.getsize(root / "latents" / f"latents-{i:06d}.tar")


def test_drop_mid_shard_resumes_at_the_byte_reached(root):
    with FaultyHTTPServer(root) as server:
        cut = shard_size(root) // 2 + 100  # inside a member, in the middle of the shard
        server.add_fault("/latents/latents-000001.tar", "drop", cut)
        before = remote.retry_count()
        seen, bad = epoch(server.url + PATTERN)
    keys = [k for k, _ in seen]
    assert sorted(keys) == all_keys()  # each sample once: nothing lost, nothing repeated
    ref = local_samples(root)
    assert all(torch.equal(v, ref[k]) for k, v in seen)
    assert ("/latents/latents-000001.tar", f"bytes={cut}-") in server.requests
    assert remote.retry_count() - before == 1 and bad["remote_retries"] >= 1
    assert bad["by_reason"] == {}


def test_server_without_ranges_reopens_and_skips_what_was_read(root):
    with FaultyHTTPServer(root, ranges=False) as server:
        server.add_fault("/latents/latents-000002.tar", "drop", shard_size(root, 2) // 3)
        seen, bad = epoch(server.url + PATTERN)
    assert sorted(k for k, _ in seen) == all_keys() and bad["by_reason"] == {}


def test_503_and_429_are_retried_with_backoff(root):
    with FaultyHTTPServer(root) as server:
        server.add_fault("/latents/latents-000000.tar", "status", 503)
        server.add_fault("/latents/latents-000003.tar", "status", 429)
        server.add_fault("/latents/latents-000003.tar", "status", 500)
        before = remote.retry_count()
        seen, bad = epoch(server.url + PATTERN)
    assert sorted(k for k, _ in seen) == all_keys() and bad["by_reason"] == {}
    assert remote.retry_count() - before == 3


def test_stall_times_out_and_resumes(root):
    cfg = RemoteConfig(retries=2, timeout_s=1.0, backoff_s=0.01)
    with FaultyHTTPServer(root) as server:
        server.add_fault("/latents/latents-000002.tar", "stall", shard_size(root, 2) // 2, 60)
        t0 = time.monotonic()
        seen, bad = epoch(server.url + PATTERN, cfg)
        took = time.monotonic() - t0
    assert sorted(k for k, _ in seen) == all_keys() and bad["by_reason"] == {}
    assert 1.0 <= took < 10, f"the stalled read took {took:.1f} s with data.remote.timeout_s=1"
    assert any(p == "/latents/latents-000002.tar" and r and r != "bytes=0-" for p, r in server.requests)


def test_missing_shard_is_counted_and_named(root, capsys):
    with FaultyHTTPServer(root) as server:
        server.add_fault("/latents/latents-000002.tar", "always", 404)
        seen, bad = epoch(server.url + PATTERN)
        assert sorted(k for k, _ in seen) == [k for k in all_keys() if not 12 <= int(k[6:]) < 18]
        url = server.url + "/latents/latents-000002.tar"
        assert bad_in_epoch0(bad, server.url + PATTERN, url, remote.MISSING) == {remote.MISSING: 1}
        assert f"{url}: remote shard missing" in capsys.readouterr().err
        # Past data.max_bad_fraction the run stops, naming the shard and what the server said.
        server.add_fault("/latents/latents-000001.tar", "always", 403)
        with pytest.raises(DataError, match=r"latents-00000[12]\.tar: HTTP 40[34]") as e:
            epoch(server.url + PATTERN, max_bad_fraction=0.01, min_samples_for_bad_check=5)
    assert "data.max_bad_fraction" in str(e.value)


def test_retries_are_bounded(root):
    with FaultyHTTPServer(root) as server:
        server.add_fault("/latents/latents-000000.tar", "always", 503)
        t0 = time.monotonic()
        seen, bad = epoch(server.url + PATTERN, RemoteConfig(retries=2, timeout_s=1.0, backoff_s=0.05))
    assert time.monotonic() - t0 < 5
    url = server.url + "/latents/latents-000000.tar"
    assert bad_in_epoch0(bad, server.url + PATTERN, url, remote.GAVE_UP) == {remote.GAVE_UP: 1} and len(seen) == (SHARDS - 1) * PER_SHARD
    # The first try and 2 retries (twice if epoch 1 opened this shard first).
    again = seeding.shuffled(expand_shards(server.url + PATTERN, "x"), "shard-order", 0, 1, 0, 0)[0] == url
    assert [p for p, _ in server.requests].count("/latents/latents-000000.tar") == 3 * (1 + again)


def test_empty_prompt_comes_from_the_url_folder(root):
    with FaultyHTTPServer(root) as server:
        got = load_empty_prompt(server.url + PATTERN, FAST)
    assert torch.equal(got, load_empty_prompt(str(root / "latents")))


def test_s3_shards_through_moto_with_a_drop_a_503_and_a_missing_key(root):
    spec = "s3://data/lat/latents-{000000..000003}.tar"
    with moto_s3() as (_, _, upstream):
        client = remote.s3_client(FAST)
        client.create_bucket(Bucket="data")
        for name in sorted(os.listdir(root / "latents")):
            client.upload_file(str(root / "latents" / name), "data", f"lat/{name}")
        client.delete_object(Bucket="data", Key="lat/latents-000003.tar")
        prompt = load_empty_prompt(spec, FAST)
        # The faults sit in a proxy in front of moto; boto3 reaches it through data.remote.endpoint_url.
        with FaultyHTTPServer(upstream=upstream) as proxy:
            proxy.add_fault("/data/lat/latents-000001.tar", "drop", shard_size(root) // 2)
            proxy.add_fault("/data/lat/latents-000002.tar", "status", 503)
            before = remote.retry_count()
            seen, bad = epoch(spec, RemoteConfig(retries=3, timeout_s=5.0, backoff_s=0.01, endpoint_url=proxy.url))
    ref = local_samples(root)
    assert sorted(k for k, _ in seen) == all_keys()[: 3 * PER_SHARD]  # each once
    assert all(torch.equal(v, ref[k]) for k, v in seen)
    assert bad_in_epoch0(bad, spec, "s3://data/lat/latents-000003.tar", remote.MISSING) == {remote.MISSING: 1}
    # From the last byte handed out: the drop point, or the start of the read the drop cut short.
    ranges = [int(r[len("bytes="):-1]) for p, r in proxy.requests if p == "/data/lat/latents-000001.tar" and r]
    assert len(ranges) == 1 and 0 < ranges[0] <= shard_size(root) // 2
    assert remote.retry_count() - before == 2
    assert prompt.shape == (8, 32)


def test_global_order_over_http_reads_the_local_batches_at_any_world_size(root, tmp_path):
    """data.order=global over URLs: the manifest's sample offsets, range reads batched per shard, and the
    micro-batches of local files at world sizes 2 and 1, from any position (a resharded resume)."""
    served = tmp_path / "served"
    shutil.copytree(root / "latents", served / "latents")
    paths = sorted(str(p) for p in (served / "latents").glob("*.tar"))
    manifest = {"shards": [{"name": os.path.basename(p), "index": latent_order.shard_index(p)} for p in paths]}
    (served / "latents" / "manifest.json").write_text(json.dumps(manifest))

    def batches(spec, rank, world, start, n, cfg=FAST):
        ds = LatentDataset(spec, order="global", rank=rank, world_size=world, batch_size=2, seed=3,
                           start_global=start, remote_cfg=cfg)
        return [(b["position"], b["keys"], b["video_latents"], b["image_latents"])
                for b in itertools.islice(make_loader(ds, 0), n)]

    def same(a, b):
        return len(a) == len(b) and all(x[:2] == y[:2] and torch.equal(x[2], y[2]) and torch.equal(x[3], y[3])
                                        for x, y in zip(a, b))

    local = str(served / "latents")
    before = remote.retry_count()
    with FaultyHTTPServer(served) as server:
        url = server.url + PATTERN
        server.add_fault("/latents/latents-000002.tar", "drop", 700)  # a range read cut short, resumed
        for rank in (0, 1):  # 2 ranks from the start: 12 micro-batches = one epoch, and into the next
            assert same(batches(url, rank, 2, 0, 8), batches(local, rank, 2, 0, 8))
        assert same(batches(url, 0, 1, 6, 8), batches(local, 0, 1, 6, 8))  # resumed alone at position 6
        retries = remote.retry_count() - before
        gets = [r for p, r in server.requests if p.endswith(".tar")]
    samples_read = 2 * 8 * 2 + 8 * 2
    # At most one request per sample (its two members, neighbours in a shard, share one) and the resume.
    assert len(gets) <= samples_read + 1
    assert all(r and r != "bytes=0-" for r in gets)  # ranges, never the whole shard
    assert retries == 1
    (served / "latents" / "manifest.json").unlink()
    with FaultyHTTPServer(served) as server:
        with pytest.raises(DataError, match=r"manifest\.json: no manifest .*data\.order=stream"):
            LatentDataset(server.url + PATTERN, order="global", remote_cfg=FAST)
