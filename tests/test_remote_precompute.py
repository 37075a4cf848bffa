"""The precompute job reads its video shards from an S3-compatible server (moto, on 127.0.0.1) and
writes its latent shards there, is SIGKILLed after its first shard and rerun, and ends with the latent
shards of the same job over local files: every clip encoded once, the manifest uploaded last."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import random
import signal
import time

from i2v.config import RemoteConfig
from i2v.data import latent_order, remote
from i2v.data.latents import LatentDataset, make_loader
from i2v.data_prep.make_shards import make_shards
from i2v.data.lineage import manifest_encoders
from i2v.data_prep.precompute import run
from i2v.data.synthetic import random_spec, render, write_mp4
from remote_servers import moto_s3
from runs import BACKGROUNDS, SMALL, cfg_for, launch_precompute, read_shard, tars


def test_precompute_reads_s3_survives_sigkill_and_encodes_each_clip_once(tmp_path):
    rng = random.Random(0)
    os.makedirs(tmp_path / "clips")
    for i, bg in enumerate(BACKGROUNDS[:6]):
        spec = dataclasses.replace(random_spec(rng, 64, 64, 12), background=bg)
        write_mp4(str(tmp_path / "clips" / f"c{i:02d}.mp4"), [render(spec, t, 64, 64) for t in range(12)], 8)
        (tmp_path / "clips" / f"c{i:02d}.txt").write_text(spec.caption)
    shards = tmp_path / "shards"
    make_shards(str(tmp_path / "clips"), str(shards), 2, 1, 1, progress=False)
    ref = str(tmp_path / "ref")
    run(cfg_for(shards, ref), progress=False)  # the same job over the local files

    with moto_s3() as (_, env, _):
        client = remote.s3_client(RemoteConfig())
        client.create_bucket(Bucket="videos")
        for name in sorted(os.listdir(shards)):
            client.upload_file(str(shards / name), "videos", f"shards/{name}")
        out = remote.OutputFolder("s3://videos/latents")
        args = ["data.video_shards=s3://videos/shards/shard-{000000..000002}.tar", f"data.latent_shards={out.spec}",
                *SMALL]
        proc = launch_precompute(args, env)
        deadline = time.time() + 120
        while not out.exists("latents-000000.json"):
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        finished = {f"latents-{i:06d}.tar" for i in range(3) if out.exists(f"latents-{i:06d}.json")}
        assert "latents-000000.tar" in finished and len(finished) < 3
        assert all(out.exists(n) for n in finished)  # a record is uploaded after its shard
        assert not out.exists("manifest.json")
        rerun = launch_precompute(args, env)
        stdout, stderr = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, stderr
        listed = sorted(o["Key"] for o in client.list_objects_v2(Bucket="videos", Prefix="latents/")["Contents"])
        got = {n: hashlib.sha256(out.read(n)).hexdigest() for n in tars(ref)}
        manifest = json.loads(out.read("manifest.json"))
        ds = LatentDataset("s3://videos/latents/latents-{000000..000002}.tar", order="stream", batch_size=1,
                           shuffle_buffer=0, resampled=False)
        keys = [b["keys"][0] for b in itertools.islice(make_loader(ds, 0), 6)]
        # The manifest's sample offsets serve the global order by range reads; a folder URL is listed.
        ds = LatentDataset("s3://videos/latents/", order="global", batch_size=1)
        assert ds.urls == [f"s3://videos/latents/latents-{i:06d}.tar" for i in range(3)]
        global_keys = [b["keys"][0] for b in itertools.islice(make_loader(ds, 0), 6)]
        # Training over these shards takes its encoders from the uploaded manifest, as from a local one.
        encoders_there, _ = manifest_encoders("s3://videos/latents/latents-{000000..000002}.tar")
    assert f"{3 - len(finished)} shard(s) written" in stdout and f"{len(finished)} already finished" in stdout
    assert got == tars(ref)  # byte for byte: each clip once, in its shard, as from local files
    assert listed == sorted(f"latents/{n}" for n in os.listdir(ref) if not n.endswith(".tmp"))
    assert manifest["samples"] == 6 and manifest["rejected"] == 0
    assert [s["source"] for s in manifest["shards"]] == [f"s3://videos/shards/shard-{i:06d}.tar" for i in range(3)]
    assert sorted(keys) == sorted(global_keys) == sorted(k for n in tars(ref) for k in read_shard(os.path.join(ref, n)))
    assert [s["index"] for s in manifest["shards"]] == [latent_order.shard_index(os.path.join(ref, n)) for n in tars(ref)]
    assert encoders_there is not None and encoders_there == manifest_encoders(ref)[0]
