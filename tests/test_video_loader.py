"""The video shard reader: shapes, frame choice by timestamp, seeking, buckets, bad samples."""

import io
import tarfile

import av
import numpy as np
import pytest
import torch

import clips
from i2v.config import VideoConfig, from_dict
from i2v.data.shards import BadSamples
from i2v.data.videos import iter_shard_clips
from i2v.data_prep.make_shards import make_shards
from i2v.core.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """16 small clips in 8 shards of 2, plus a long clip (600 frames, keyframe every 24) alone in a shard."""
    src = tmp_path_factory.mktemp("src")
    for i in range(16):
        clips.encode(src / f"c{i:02d}.mp4", frames=12 + i, width=48 if i % 2 else 32, height=32)
        clips.caption(src / f"c{i:02d}.mp4", f"clip {i}")
    shards = tmp_path_factory.mktemp("shards")
    make_shards(str(src), str(shards), samples_per_shard=2, progress=False)
    long_src = tmp_path_factory.mktemp("long")
    clips.encode(long_src / "long.mp4", frames=600, gop=24)
    clips.caption(long_src / "long.mp4", "a long clip")
    clips.encode(long_src / "vfr.mkv", pts=[0, 40, 80, 200, 240, 500, 540, 580, 900, 940, 980, 1020])
    clips.caption(long_src / "vfr.mkv", "variable frame rate")
    long_shards = tmp_path_factory.mktemp("long_shards")
    make_shards(str(long_src), str(long_shards), samples_per_shard=10, progress=False)
    return shards, long_shards / "shard-000000.tar"


def keys_of(items):
    return [c["__key__"] for c in items]


def test_shapes_ranges_and_order(synthetic):
    shards, _ = synthetic
    video = VideoConfig(frames=5, height=16, width=24)
    out = list(iter_shard_clips(str(shards / "shard-000003.tar"), video))
    assert keys_of(out) == ["000000006", "000000007"]  # stored order
    for c in out:
        assert c["video"].shape == (5, 3, 16, 24) and c["video"].dtype == torch.float32
        assert c["image"].shape == (3, 16, 24) and torch.equal(c["image"], c["video"][0])
        assert -1.0 <= c["video"].min() and c["video"].max() <= 1.0
        assert c["caption"] == f"clip {int(c['__key__'])}"
        assert c["meta"]["frames"] == 12 + int(c["__key__"])


def test_centred_clip_picks_middle_frames_and_fps_resamples(synthetic):
    shards, _ = synthetic
    # c06 has 18 frames at 24 fps: 5 frames centred start at (18 - 5) // 2 = 6.
    c = next(iter_shard_clips(str(shards / "shard-000003.tar"), VideoConfig(frames=5, height=16, width=16)))
    assert [clips.frame_index(f.numpy()) for f in c["video"]] == [6, 7, 8, 9, 10]
    # At 12 fps every second source frame: span 8 frames, slack 9, start 4.
    c = next(iter_shard_clips(str(shards / "shard-000003.tar"), VideoConfig(frames=5, height=16, width=16, fps=12)))
    assert [clips.frame_index(f.numpy()) for f in c["video"]] == [4, 6, 8, 10, 12]
    # At 48 fps each source frame is used twice (half-way targets go to the later frame),
    # the repeat being an exact copy.
    c = next(iter_shard_clips(str(shards / "shard-000003.tar"), VideoConfig(frames=6, height=16, width=16, fps=48)))
    s = clips.frame_index(c["video"][0].numpy())
    assert [clips.frame_index(f.numpy()) for f in c["video"]] == [s, s + 1, s + 1, s + 2, s + 2, s + 3]
    assert torch.equal(c["video"][1], c["video"][2]) and torch.equal(c["video"][3], c["video"][4])
    # Stride 3: span 12 frames, slack 5, start 2.
    c = next(iter_shard_clips(str(shards / "shard-000003.tar"), VideoConfig(frames=5, height=16, width=16, stride=3)))
    assert [clips.frame_index(f.numpy()) for f in c["video"]] == [2, 5, 8, 11, 14]


def test_variable_frame_rate_follows_timestamps(synthetic):
    _, long_shard = synthetic
    out = {c["caption"]: c for c in iter_shard_clips(str(long_shard), VideoConfig(frames=6, height=16, width=16, fps=10))}
    c = out["variable frame rate"]
    pts = [0, 0.04, 0.08, 0.2, 0.24, 0.5, 0.54, 0.58, 0.9, 0.94, 0.98, 1.02]
    t0 = c["meta"]["clip_start"]
    want = [min(range(len(pts)), key=lambda k: abs(pts[k] - (t0 + i / 10))) for i in range(6)]
    got = [clips.frame_index(f.numpy()) for f in c["video"]]
    assert got == want
    assert got != list(range(got[0], got[0] + 6))  # not consecutive frame indices


def test_seek_decodes_far_fewer_frames_than_the_file_holds(synthetic):
    _, long_shard = synthetic
    out = {c["caption"]: c for c in iter_shard_clips(str(long_shard), VideoConfig(frames=9, height=16, width=16))}
    c = out["a long clip"]
    assert [clips.frame_index(f.numpy()) for f in c["video"]] == list(range(295, 304))  # (600 - 9) // 2 = 295
    assert c["meta"]["decoded_frames"] <= 24 + 9  # one keyframe interval plus the clip, not 600


def _bad_shard(path, tmp):
    """A shard holding files make_shards would reject, next to oddly shaped good ones."""
    good = {
        "g_odd_444": clips.encode(tmp / "odd.mp4", width=33, height=17, pix_fmt="yuv444p"),
        "g_vp9": clips.encode(tmp / "v.webm", codec="libvpx-vp9"),
        "g_avi": clips.encode(tmp / "m.avi", codec="mpeg4"),
        "g_alpha": clips.encode(tmp / "alpha.mov", codec="png", pix_fmt="rgba"),
        "g_clear": clips.encode(tmp / "clear.mov", codec="png", pix_fmt="rgba", opacity=0),
    }
    long = clips.encode(tmp / "long.mp4", frames=60, gop=10)
    bad = {
        "b_truncated": (clips.truncated(long, tmp / "t.mp4", keep=0.5), "truncated"),
        "b_random": (clips.random_bytes(tmp / "r.mp4"), "undecodable"),
        "b_empty": (clips.empty(tmp / "e.mp4"), "empty"),
        "b_audio": (clips.audio_only(tmp / "a.mp4"), "no video stream"),
        "b_single": (clips.encode(tmp / "s.mp4", frames=1), "too few frames"),
        "b_tiny": (clips.encode(tmp / "tiny.mkv", width=1, height=1, codec="ffv1", pix_fmt="yuv444p"), "too small"),
    }
    with tarfile.open(path, "w") as t:
        for key, file in list(good.items()) + [(k, f) for k, (f, _) in bad.items()]:
            for name, data in ((f"{key}.{file.rsplit('.', 1)[1]}", open(file, "rb").read()), (f"{key}.txt", key.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return sorted(good), {k: r for k, (_, r) in bad.items()}


def test_bad_files_are_counted_by_reason_and_never_crash(tmp_path):
    good, bad_reasons = _bad_shard(tmp_path / "bad.tar", tmp_path)
    bad = BadSamples(max_fraction=1.0, min_samples=1)
    out = list(iter_shard_clips(str(tmp_path / "bad.tar"), VideoConfig(frames=5, height=16, width=16), bad=bad))
    assert sorted(keys_of(out)) == good
    for c in out:
        assert c["video"].shape == (5, 3, 16, 16) and torch.isfinite(c["video"]).all()
    assert bad.good == 5
    assert dict(bad.by_reason) == {"truncated": 1, "undecodable": 1, "empty": 1, "no video stream": 1,
                                   "too few frames": 1, "too small": 1}
    named = {k.rsplit(":", 1)[1]: r for k, r, _ in bad.examples}
    assert named == bad_reasons
    # The alpha clips are flattened onto black: an opaque one keeps its pattern...
    alpha = next(c for c in out if c["__key__"] == "g_alpha")
    assert [clips.frame_index(f.numpy()) for f in alpha["video"]] == [3, 4, 5, 6, 7]
    # ...and a fully transparent one comes out black.
    clear = next(c for c in out if c["__key__"] == "g_clear")
    assert torch.all(clear["video"] == -1.0)


def test_broken_shard_and_metadata_are_counted_not_fatal(synthetic, tmp_path):
    shards, _ = synthetic
    cut = tmp_path / "cut.tar"
    with tarfile.open(shards / "shard-000000.tar") as t:
        second = t.getmember("000000001.mp4")
    data = (shards / "shard-000000.tar").read_bytes()
    cut.write_bytes(data[:second.offset_data + second.size // 2])  # ends inside the second video
    meta = tmp_path / "meta.tar"
    with tarfile.open(shards / "shard-000001.tar") as src, tarfile.open(meta, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name == "000000002.json":
                data = b"{not json"
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    bad = BadSamples(max_fraction=1.0, min_samples=1)
    video = VideoConfig(frames=5, height=16, width=16)
    got = [c["__key__"] for url in (cut, meta, shards / "shard-000002.tar")
           for c in iter_shard_clips(str(url), video, bad=bad)]
    assert got == ["000000000", "000000003", "000000004", "000000005"]
    assert dict(bad.by_reason) == {"shard read error": 1, "bad metadata": 1}
    assert [k for k, _, _ in bad.examples] == [str(cut), f"{meta}:000000002"]


def test_max_bad_fraction_stops_with_keys_named(tmp_path):
    _bad_shard(tmp_path / "bad.tar", tmp_path)
    bad = BadSamples(max_fraction=0.2, min_samples=4)
    with pytest.raises(DataError, match=r"max_bad_fraction.*b_(truncated|random|empty|audio)"):
        list(iter_shard_clips(str(tmp_path / "bad.tar"), VideoConfig(frames=5, height=16, width=16), bad=bad))


def test_buckets_by_aspect(synthetic):
    shards, _ = synthetic
    # Clips alternate 32x32 (square) and 48x32 (wide); the wide ones go to the 16x24 bucket.
    video = VideoConfig(frames=5, height=16, width=16, buckets=[[16, 16, 5], [16, 24, 5], [8, 8, 40]])
    out = [c for i in range(8) for c in iter_shard_clips(str(shards / f"shard-{i:06d}.tar"), video)]
    assert len(out) == 16
    for c in out:
        wide = int(c["__key__"]) % 2 == 1
        assert tuple(c["video"].shape) == ((5, 3, 16, 24) if wide else (5, 3, 16, 16))
        assert c["meta"]["bucket"] == ([16, 24, 5] if wide else [16, 16, 5])


@pytest.mark.parametrize("key", ["random_start", "random_crop"])
def test_random_clip_switches_are_unknown_keys(key):
    # Clips are always centred: nothing reads video shards for training, so the switches went.
    with pytest.raises(ConfigError, match=f"data.video.{key}: unknown key"):
        from_dict({"run": {"output_dir": "unused"}, "data": {"latent_shards": "unused", "video": {key: False}}})


def test_real_clips(shared_videos, tmp_path):
    make_shards(str(shared_videos), str(tmp_path), samples_per_shard=10, progress=False)
    bad = BadSamples(max_fraction=0.0, min_samples=1)
    out = list(iter_shard_clips(str(tmp_path / "shard-000000.tar"), VideoConfig(frames=9, height=24, width=40), bad=bad))
    assert bad.bad == 0 and len(out) == 6
    by_name = {c["meta"]["source"].rsplit("/", 1)[1]: c for c in out}
    for c in out:
        assert c["video"].shape == (9, 3, 24, 40)
        assert -1.0 <= c["video"].min() and c["video"].max() <= 1.0
        assert c["caption"]
    # Centre clips of the long files decode a fraction of them.
    assert by_name["cockatoo.mp4"]["meta"]["decoded_frames"] < 280 // 2
    for name, c in by_name.items():
        # Independent check of time, crop and colour: the mean of our first frame matches the
        # mean of the same region of the source frame at clip_start, decoded at full size.
        with av.open(str(shared_videos / name)) as src:
            frame = min(src.decode(video=0), key=lambda f: abs(f.time - c["meta"]["clip_start"]))
            full = frame.to_ndarray(format="rgb24").astype(np.float64)
        (sw, sh), (x0, y0, w, h) = c["meta"]["resized"], c["meta"]["crop"]
        H, W = full.shape[:2]
        region = full[round(y0 * H / sh):round((y0 + h) * H / sh), round(x0 * W / sw):round((x0 + w) * W / sw)]
        ours = (c["image"].numpy().astype(np.float64) + 1) * 127.5
        assert abs(ours.mean() - region.mean()) < 2.0, name
