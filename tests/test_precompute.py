"""The precompute job: image conditioning is the first frame plus noise, outputs are deterministic,
resumable after SIGKILL, and identical at any world size; rejects and empty shards are reported."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import signal
import tarfile
import time

import pytest
import torch

from i2v.data.latents import LatentDataset, load_empty_prompt
from i2v.data.videos import iter_shard_clips
from i2v.model import encoders
from i2v.data_prep.precompute import assignment, output_name, run, summary_lines
from i2v.data_prep.make_shards import make_shards
from i2v.data.synthetic import random_spec, render, write_mp4
from i2v.core.errors import ConfigError, DataError

from runs import BACKGROUNDS, SMALL, cfg_for, launch_precompute, read_shard, sha, tars


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """12 varied synthetic clips (moving shapes on distinct backgrounds) in 4 video shards of 3."""
    root = tmp_path_factory.mktemp("videos")
    os.makedirs(root / "clips")
    rng = random.Random(0)
    for i, bg in enumerate(BACKGROUNDS):
        spec = dataclasses.replace(random_spec(rng, 64, 64, 12), background=bg)
        write_mp4(str(root / "clips" / f"c{i:02d}.mp4"), [render(spec, t, 64, 64) for t in range(12)], 8)
        (root / "clips" / f"c{i:02d}.txt").write_text(spec.caption)
    make_shards(str(root / "clips"), str(root / "shards"), 3, 1, 1, progress=False)
    return str(root / "shards")


@pytest.fixture(scope="module")
def baseline(shards, tmp_path_factory):
    """One in-process run with the tiny defaults (mode latents, K=2, log sigma ~ N(-3, 0.5))."""
    out = str(tmp_path_factory.mktemp("baseline") / "latents")
    cfg = cfg_for(shards, out)
    summary = run(cfg, progress=False)
    return cfg, out, summary


def frame0_latents(cfg, shards) -> tuple[list[str], torch.Tensor]:
    """Independent reference: each clip's clean first frame through the VAE alone, [N, C, h, w]."""
    vae = encoders.build_vae(cfg)
    keys, lats = [], []
    for name in sorted(os.listdir(shards)):
        if not name.endswith(".tar"):
            continue
        for clip in iter_shard_clips(os.path.join(shards, name), cfg.data.video):
            with torch.no_grad():
                lat = vae.encode(clip["image"][None, :, None]).latent_dist.mode()
            keys.append(f"{name}:{clip['__key__']}")
            lats.append(lat[0, :, 0] * vae.config.scaling_factor)
    return keys, torch.stack(lats)


def all_samples(out) -> dict:
    samples = {}
    for name in sorted(os.listdir(out)):
        if name.endswith(".tar"):
            for key, (t, meta) in read_shard(os.path.join(out, name)).items():
                samples[f"{meta['source_shard']}:{key}"] = (t, meta)
    return samples


def test_image_latents_are_the_vae_of_frame0_when_sigma_is_zero(shards, tmp_path):
    cfg = cfg_for(shards, tmp_path / "lat", "precompute.image_log_sigma_mean=-200", "precompute.image_log_sigma_std=0")
    run(cfg, progress=False)
    keys, ref = frame0_latents(cfg, shards)
    samples = all_samples(str(tmp_path / "lat"))
    assert sorted(samples) == sorted(keys)
    vae = encoders.build_vae(cfg)
    for key, r in zip(keys, ref):
        t, meta = samples[key]
        assert meta["sigmas"] == [0.0, 0.0]
        assert t["image_latents"].shape == (2, 1, *r.shape)
        for k in range(2):
            torch.testing.assert_close(t["image_latents"][k, 0], r, atol=1e-5, rtol=1e-5)
    # The video latents are the whole clip through the VAE, frames first, scaled.
    clip = next(iter_shard_clips(os.path.join(shards, "shard-000000.tar"), cfg.data.video))
    with torch.no_grad():
        lat = vae.encode(clip["video"].permute(1, 0, 2, 3)[None]).latent_dist.mode()
    got = samples[f"shard-000000.tar:{clip['__key__']}"][0]["video_latents"]
    torch.testing.assert_close(got, lat[0].permute(1, 0, 2, 3) * vae.config.scaling_factor, atol=1e-5, rtol=1e-5)


def test_each_image_latent_is_nearest_to_its_own_first_frame(shards, baseline):
    """Regression test for encoding sigma * noise alone: the condition must identify its clip."""
    cfg, out, _ = baseline
    keys, ref = frame0_latents(cfg, shards)
    samples = all_samples(out)
    for i, key in enumerate(keys):
        img = samples[key][0]["image_latents"]
        for k in range(img.shape[0]):
            dist = ((ref - img[k, 0]) ** 2).flatten(1).sum(1)
            assert int(dist.argmin()) == i, f"{key} draw {k}: nearest clip is {keys[int(dist.argmin())]}"
            assert dist[i] > 0  # noise was added: not the clean latent


def test_draws_differ_and_sigmas_are_recorded(baseline):
    cfg, out, _ = baseline
    samples = all_samples(out)
    assert len(samples) == 12
    sig = []
    vae_scale = encoders.build_vae(cfg).config.scaling_factor  # configs/tiny.yaml's VAE, pretrained or random-init
    for key, (t, meta) in samples.items():
        assert not torch.equal(t["image_latents"][0], t["image_latents"][1]), key
        assert len(meta["sigmas"]) == 2 and meta["sigmas"][0] != meta["sigmas"][1]
        sig += meta["sigmas"]
        assert meta["source_key"] == key.split(":")[1]
        assert meta["frames"] == 9 and meta["latent_frames"] == 3 and meta["size"] == [32, 32]
        assert meta["scaling_factor"] == pytest.approx(vae_scale)
        # Weights are identified by their hash: a random-init encoder's tensors, a pretrained one's files.
        assert all(meta[e].get("weights_sha256") or meta[e].get("files_sha256") for e in ("vae", "text_encoder"))
        assert meta["caption"].startswith("a ") and meta["fps"] == 8.0
    logs = torch.tensor(sig).log()
    assert -3.6 < float(logs.mean()) < -2.4 and 0.2 < float(logs.std()) < 0.9  # log sigma ~ N(-3, 0.5)
    # The empty prompt's embedding is stored once and equals the encoder's output for "".
    torch.testing.assert_close(load_empty_prompt(out), encoders.build_text_encoder(cfg)([""])[0])


def test_manifest_and_the_trainer_reads_the_shards(baseline):
    cfg, out, summary = baseline
    m = json.load(open(os.path.join(out, "manifest.json")))
    assert m["samples"] == 12 and m["rejected"] == 0 and m["empty_shards"] == []
    assert [s["name"] for s in m["shards"]] == [f"latents-00000{i}.tar" for i in range(4)]
    for s in m["shards"]:
        assert s["sha256"] == sha(os.path.join(out, s["name"])) and s["samples"] == 3
    assert m["shapes"] == [{"video_latents": [3, 4, 8, 8], "image_latents": [2, 1, 4, 8, 8],
                            "prompt_embeds": [8, 32], "samples": 12}]
    assert m["vae"]["latent_channels"] == 4 and m["text_encoder"]["d_model"] == 32
    assert summary["written"] == 4 and summary["manifest"] is not None
    ds = LatentDataset(out, batch_size=2, resampled=False, shuffle_buffer=0, expect={"channels": 4, "text_dim": 32})
    batch = next(iter(ds))
    assert batch["video_latents"].shape == (2, 3, 4, 8, 8) and batch["image_latents"].shape == (2, 1, 4, 8, 8)


def test_rerun_is_idempotent_and_output_is_deterministic(shards, baseline, tmp_path):
    cfg, out, _ = baseline
    before = {n: (sha(os.path.join(out, n)), os.stat(os.path.join(out, n)).st_mtime_ns) for n in tars(out)}
    again = run(cfg, progress=False)
    assert again["written"] == 0 and again["skipped"] == 4
    assert {n: (sha(os.path.join(out, n)), os.stat(os.path.join(out, n)).st_mtime_ns) for n in tars(out)} == before
    fresh = str(tmp_path / "fresh")
    run(cfg_for(shards, fresh), progress=False)
    assert tars(fresh) == tars(out)


def test_sigkill_then_rerun_completes_exactly_what_is_missing(shards, baseline, tmp_path):
    _, ref, _ = baseline
    out = str(tmp_path / "lat")
    args = [f"data.video_shards={shards}", f"data.latent_shards={out}", *SMALL]
    proc = launch_precompute(args)
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(out, "latents-000000.json")):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {n for n in tars(out) if os.path.exists(os.path.join(out, n[:-4] + ".json"))}
    assert "latents-000000.tar" in finished and len(finished) < 4
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    rerun = launch_precompute(args)
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert f"{4 - len(finished)} shard(s) written" in stdout and f"{len(finished)} already finished" in stdout
    assert tars(out) == tars(ref)
    assert not [n for n in os.listdir(out) if ".tmp-" in n]
    assert json.load(open(os.path.join(out, "manifest.json")))["samples"] == 12


def test_two_ranks_write_disjoint_shards_equal_to_one_process(shards, baseline, tmp_path):
    _, ref, _ = baseline
    out = str(tmp_path / "lat")
    args = [f"data.video_shards={shards}", f"data.latent_shards={out}", *SMALL]
    procs = [launch_precompute(args, {"RANK": str(r), "WORLD_SIZE": "2"}) for r in range(2)]
    for p in procs:
        _, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr
    ranks = {n: json.load(open(os.path.join(out, n[:-4] + ".json")))["rank"] for n in tars(out)}
    assert ranks == {"latents-000000.tar": 0, "latents-000001.tar": 1, "latents-000002.tar": 0, "latents-000003.tar": 1}
    assert tars(out) == tars(ref)
    assert json.load(open(os.path.join(out, "manifest.json")))["samples"] == 12


def _bad_shard(path, good_mp4: bytes | None = None):
    with tarfile.open(path, "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("000000100.mp4", os.urandom(3000))
        add("000000100.txt", b"garbage")
        add("000000101.mp4", b"")
        add("000000101.txt", b"empty")
        if good_mp4 is not None:
            add("000000102.mp4", good_mp4)
            add("000000102.txt", b"a red square moving left")


def test_rejects_are_listed_and_an_all_bad_shard_is_empty_and_valid(shards, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    with tarfile.open(os.path.join(shards, "shard-000000.tar")) as tar:
        good = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".mp4"))).read()
    _bad_shard(videos / "shard-000000.tar")
    _bad_shard(videos / "shard-000001.tar", good)
    out = tmp_path / "lat"
    summary = run(cfg_for(str(videos), str(out)), progress=False)
    m = summary["manifest"]
    assert m["samples"] == 1 and m["rejected"] == 4 and m["empty_shards"] == ["latents-000000.tar"]
    with tarfile.open(out / "latents-000000.tar") as tar:
        assert tar.getmembers() == []
    rejects = [json.loads(line) for line in open(out / "rejects.jsonl")]
    assert len(rejects) == 4 and all(r["reason"] for r in rejects)
    assert {r["shard"] for r in rejects} == {"shard-000000.tar", "shard-000001.tar"}
    assert any("000000101" in r["key"] for r in rejects)
    # Finished shards written with other settings are never mixed into a dataset.
    with pytest.raises(DataError, match="other precompute settings.*image_draws: 2 there, 3 here"):
        run(cfg_for(str(videos), str(out), "precompute.image_draws=3"), progress=False)
    # A shard whose first-frame noise came from another stream (e.g. a device-dependent one) is named too.
    record_file = out / "latents-000001.json"
    record = json.loads(record_file.read_text())
    record["settings"]["condition_noise"], record["fingerprint"] = "triton-cuda", "other"
    record_file.write_text(json.dumps(record))
    with pytest.raises(DataError, match='condition_noise: "triton-cuda" there, "torch-cpu" here'):
        run(cfg_for(str(videos), str(out)), progress=False)


def _tar(path, members: list[tuple[str, bytes]]):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def known_bad(shards, tmp_path_factory):
    """3 video shards holding 3 good clips and 6 bad samples of 5 reasons, some after a shard's last good clip."""
    root = tmp_path_factory.mktemp("known_bad")
    with tarfile.open(os.path.join(shards, "shard-000000.tar")) as tar:
        good = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".mp4"))).read()
    _tar(root / "shard-000000.tar", [("a0.mp4", good), ("a0.txt", b"good"),
                                     ("a1.mp4", os.urandom(3000)), ("a1.txt", b"corrupt"),
                                     ("a2.mp4", b""), ("a2.txt", b"empty")])
    _tar(root / "shard-000001.tar", [("b0.mp4", good[: len(good) // 2]), ("b0.txt", b"truncated"),
                                     ("b1.txt", b"the video member is missing"),
                                     ("b2.mp4", good), ("b2.txt", b"good")])
    _tar(root / "shard-000002.tar", [("c0.mp4", good), ("c0.json", b"{not json"), ("c0.txt", b"bad metadata"),
                                     ("c1.mp4", good), ("c1.txt", b"good"),
                                     ("c2.mp4", b""), ("c2.txt", b"empty")])
    truth = {"shard-000000.tar": {"a1": "undecodable", "a2": "empty"},
             "shard-000001.tar": {"b0": "truncated", "b1": "no video file in sample"},
             "shard-000002.tar": {"c0": "bad metadata", "c2": "empty"}}
    return str(root), truth


@pytest.mark.parametrize("workers,world", [(2, 1), (2, 2)])
def test_rejects_from_every_worker_and_rank_reach_manifest_and_log(known_bad, tmp_path, workers, world):
    videos, truth = known_bad
    by_reason = {"bad metadata": 1, "empty": 2, "no video file in sample": 1, "truncated": 1, "undecodable": 1}
    reasons = "(bad metadata: 1, empty: 2, no video file in sample: 1, truncated: 1, undecodable: 1)"

    def job(out, n, rank=0, world=1):
        return run(cfg_for(videos, str(out), f"data.num_workers={n}"), rank, world, progress=False)

    serial = job(tmp_path / "w0", 0)
    summaries = [job(tmp_path / "wn", workers, r, world) for r in range(world)]
    for out, last in ((tmp_path / "w0", serial), (tmp_path / "wn", summaries[-1])):
        m = json.load(open(out / "manifest.json"))
        assert m["samples"] == 3 and m["rejected"] == 6 and m["rejected_by_reason"] == by_reason
        got: dict = {}
        for line in open(out / "rejects.jsonl"):
            r = json.loads(line)
            got.setdefault(r["shard"], {})[r["key"].rsplit(":", 1)[1]] = r["reason"]
        assert got == truth
        assert f"6 rejected {reasons}" in summary_lines(last)[-1]
    assert tars(tmp_path / "wn") == tars(tmp_path / "w0")
    # Each rank's own line counts the rejects of its shards, whichever worker read them.
    per_rank = [sum(len(truth[f"shard-00000{i}.tar"]) for i in range(r, 3, world)) for r in range(world)]
    assert [s["rejected"] for s in summaries] == per_rank
    assert [f"{n} rejected" in summary_lines(s)[0] for s, n in zip(summaries, per_rank)] == [True] * world
    assert f"6 rejected {reasons}" in summary_lines(serial)[0]


def test_assignment_and_names():
    urls = [f"/d/shard-{i:06d}.tar" for i in range(5)]
    assert output_name(urls[3]) == "latents-000003.tar"
    mine = [assignment(urls, r, 2) for r in range(2)]
    assert [n for _, n in mine[0]] == ["latents-000000.tar", "latents-000002.tar", "latents-000004.tar"]
    assert [n for _, n in mine[1]] == ["latents-000001.tar", "latents-000003.tar"]


@pytest.mark.parametrize("override,message", [
    ("data.video.frames=8", "data.video.frames"),
    ("precompute.samples_per_shard=5", "precompute.samples_per_shard"),
    ("precompute.vae.pretrained=/nonexistent", "precompute.vae.pretrained: directory not found"),
    ("precompute.text_encoder.max_length=9", "precompute.text_encoder.max_length"),
])
def test_a_config_error_leaves_no_output_folder(shards, tmp_path, override, message):
    out = tmp_path / "new" / "latents"
    with pytest.raises(ConfigError, match=message):
        run(cfg_for(shards, out, override), progress=False)
    assert not os.path.exists(out) and not os.path.exists(out.parent)


def test_config_errors(shards, tmp_path):
    with pytest.raises(ConfigError, match="data.latent_shards"):
        run(cfg_for(shards, shards), progress=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"data\.latent_shards: .*file exists and is not a directory"):
        run(cfg_for(shards, tmp_path / "file"), progress=False)
    proc = launch_precompute([f"data.video_shards={shards}", f"data.latent_shards={tmp_path}/b", *SMALL,
                    "precompute.vae.arch.latent_channels=8"])
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert stderr.startswith("error: precompute.vae.arch.latent_channels") and "Traceback" not in stderr
    assert not os.path.exists(tmp_path / "b")
