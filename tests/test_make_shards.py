"""make_shards: packing, rejects with reasons, layout, determinism, resume, launcher errors."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

import clips
from i2v.data_prep.make_shards import list_inputs, make_shards
from i2v.core.errors import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> expected reject reason (None: packed)
EXPECTED = {
    "a_plain.mp4": None,
    "b_odd_444.mp4": None,
    "c_vp9.webm": None,
    "d_mpeg4.avi": None,
    "e_alpha.mov": None,
    "f_vfr.mkv": None,
    "g_tiny.mkv": None,
    "h_single.mp4": "too few frames",
    "i_truncated.mp4": "truncated",
    "j_random.mp4": "undecodable",
    "k_empty.mp4": "empty",
    "l_audio_only.mp4": "no video stream",
    "m_no_caption.mp4": "no caption",
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    clips.encode(d / "a_plain.mp4", frames=20, audio=True)
    clips.encode(d / "b_odd_444.mp4", width=33, height=17, pix_fmt="yuv444p")
    clips.encode(d / "c_vp9.webm", codec="libvpx-vp9")
    clips.encode(d / "d_mpeg4.avi", codec="mpeg4")
    clips.encode(d / "e_alpha.mov", codec="png", pix_fmt="rgba")
    clips.encode(d / "f_vfr.mkv", pts=[0, 40, 80, 200, 240, 500, 540, 580, 900, 940, 980, 1020])
    clips.encode(d / "g_tiny.mkv", width=1, height=1, codec="ffv1", pix_fmt="yuv444p")
    clips.encode(d / "h_single.mp4", frames=1)
    long = clips.encode(d.parent / "long_source.mp4", frames=60, gop=10)
    clips.truncated(long, d / "i_truncated.mp4", keep=0.5)
    clips.random_bytes(d / "j_random.mp4")
    clips.empty(d / "k_empty.mp4")
    clips.audio_only(d / "l_audio_only.mp4")
    clips.encode(d / "m_no_caption.mp4")
    for name in EXPECTED:
        if name != "m_no_caption.mp4":
            clips.caption(d / name, f"caption of {name}")
    return d


@pytest.fixture(scope="module")
def packed(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    manifest = make_shards(str(inputs), str(out), samples_per_shard=4, workers=1, min_frames=2, progress=False)
    return out, manifest


def read_tar(path):
    with tarfile.open(path) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers()]


def test_exact_counts_and_reasons(inputs, packed):
    out, manifest = packed
    good = sorted(n for n, r in EXPECTED.items() if r is None)
    assert manifest["samples"] == len(good) == 7
    assert manifest["rejected"] == 6
    rejects = [json.loads(line) for line in open(out / "rejects.jsonl")]
    assert {os.path.basename(r["path"]): r["reason"] for r in rejects} == {
        n: r for n, r in EXPECTED.items() if r is not None}
    # 13 inputs in sorted order, 4 per shard: a-d | e-h | i-l | m. The last two hold only
    # rejects, so no tar is written for them (an empty shard would starve a reader).
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert [(s["name"], s["samples"]) for s in manifest["shards"]] == [("shard-000000.tar", 4), ("shard-000001.tar", 3)]
    assert sorted(p.name for p in out.glob("shard-*.json")) == [f"shard-00000{i}.json" for i in range(4)]
    assert manifest["total_frames"] == 20 + 12 * 6


def test_layout_original_bytes_and_metadata(inputs, packed):
    out, manifest = packed
    seen = {}
    for shard in sorted(out.glob("*.tar")):
        members = read_tar(shard)
        names = [n for n, _ in members]
        keys = sorted({n.split(".")[0] for n in names})
        for k in keys:
            exts = sorted(n.split(".", 1)[1] for n in names if n.startswith(k + "."))
            assert len(exts) == 3 and "txt" in exts and "json" in exts, exts
        files = dict(members)
        for k in keys:
            meta = json.loads(files[f"{k}.json"])
            name = os.path.basename(meta["source"])
            ext = name.rsplit(".", 1)[1]
            data = files[f"{k}.{ext}"]
            assert data == open(inputs / name, "rb").read()  # no re-encode
            assert meta["sha256"] == hashlib.sha256(data).hexdigest()
            assert files[f"{k}.txt"].decode() == f"caption of {name}"
            seen[name] = meta
    assert sorted(seen) == sorted(n for n, r in EXPECTED.items() if r is None)
    assert seen["a_plain.mp4"]["frames"] == 20 and seen["a_plain.mp4"]["fps"] == pytest.approx(24.0)
    assert (seen["b_odd_444.mp4"]["width"], seen["b_odd_444.mp4"]["height"]) == (33, 17)
    assert seen["b_odd_444.mp4"]["pix_fmt"] == "yuv444p"
    assert seen["c_vp9.webm"]["codec"] == "vp9" and seen["d_mpeg4.avi"]["codec"] == "mpeg4"
    assert seen["e_alpha.mov"]["pix_fmt"] == "rgba"
    assert seen["f_vfr.mkv"]["last_time"] == pytest.approx(1.02)
    assert seen["a_plain.mp4"]["duration"] == pytest.approx(20 / 24)


def test_rerun_is_identical_and_resume_keeps_finished_shards(inputs, packed, tmp_path):
    out, _ = packed
    again = tmp_path / "again"
    make_shards(str(inputs), str(again), samples_per_shard=4, workers=2, min_frames=2, progress=False)
    for name in ("shard-000000.tar", "shard-000001.tar", "manifest.json", "rejects.jsonl"):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name  # keys and bytes stable
    kept = os.stat(again / "shard-000000.tar")
    original_1 = (again / "shard-000001.tar").read_bytes()
    os.remove(again / "shard-000001.tar")
    (again / "shard-000001.tar.tmp999").write_bytes(b"half written")  # an interrupted write
    make_shards(str(inputs), str(again), samples_per_shard=4, workers=1, min_frames=2, progress=False)
    after = os.stat(again / "shard-000000.tar")
    assert (after.st_ino, after.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)  # not rewritten
    assert (again / "shard-000001.tar").read_bytes() == original_1
    assert not (again / "shard-000001.tar.tmp999").exists()


def test_changed_inputs_redo_the_shard(inputs, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for n in ("a_plain.mp4", "b_odd_444.mp4"):
        (src / n).write_bytes((inputs / n).read_bytes())
        clips.caption(src / n, n)
    out = tmp_path / "out"
    assert make_shards(str(src), str(out), samples_per_shard=10, progress=False)["samples"] == 2
    (src / "c.mp4").write_bytes((inputs / "a_plain.mp4").read_bytes())
    clips.caption(src / "c.mp4", "c")
    assert make_shards(str(src), str(out), samples_per_shard=10, progress=False)["samples"] == 3


def test_csv_and_jsonl_lists(inputs, tmp_path):
    (tmp_path / "list.csv").write_text(
        f"path,caption\n{inputs / 'a_plain.mp4'},a cat\n{inputs / 'nope.mp4'},gone\n")
    m = make_shards(str(tmp_path / "list.csv"), str(tmp_path / "c"), progress=False)
    assert (m["samples"], m["rejected"]) == (1, 1)
    assert json.loads((tmp_path / "c" / "rejects.jsonl").read_text())["reason"] == "missing"
    (tmp_path / "list.jsonl").write_text(json.dumps({"path": "../" + inputs.name + "/c_vp9.webm", "caption": "v"}) + "\n")
    items = list_inputs(str(tmp_path / "list.jsonl"))
    assert os.path.samefile(items[0].path, inputs / "c_vp9.webm") and items[0].caption == "v"
    m = make_shards(str(tmp_path / "list.jsonl"), str(tmp_path / "j"), progress=False)
    assert m["samples"] == 1 and (tmp_path / "j" / "shard-000000.tar").exists()


def test_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no videos found"):
        make_shards(str(tmp_path), str(tmp_path / "out"), progress=False)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "launcher", "make_shards.py"),
                           "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --input: path not found") and "Traceback" not in proc.stderr


def test_real_clips(shared_videos, tmp_path):
    m = make_shards(str(shared_videos), str(tmp_path), samples_per_shard=3, workers=2, progress=False)
    assert (m["samples"], m["rejected"], len(m["shards"])) == (6, 0, 2)
    metas = {}
    for shard in sorted(tmp_path.glob("*.tar")):
        for name, data in read_tar(shard):
            if name.endswith(".json"):
                meta = json.loads(data)
                metas[os.path.basename(meta["source"])] = meta
    # Frame counts as decoded, from the clips' README.
    assert {k: v["frames"] for k, v in metas.items()} == {
        "big_buck_bunny_1s.webm": 24, "black_mask_200x200.mp4": 300, "cockatoo.mp4": 280,
        "grey_swimmer_854x480.mp4": 48, "realshort.mp4": 36, "testcard_clock.mp4": 50}
    assert metas["cockatoo.mp4"]["pix_fmt"] == "yuv444p" and metas["big_buck_bunny_1s.webm"]["codec"] == "vp8"
    assert (metas["grey_swimmer_854x480.mp4"]["width"], metas["grey_swimmer_854x480.mp4"]["height"]) == (854, 480)
    assert m["total_frames"] == 738


def test_rerun_from_another_directory_keeps_every_shard_and_says_so(inputs, tmp_path):
    # Relative --input/--output from two working directories name the same files: the shards stay.
    shutil.copytree(inputs, tmp_path / "data" / "videos")

    def launch(cwd, src, out):
        r = subprocess.run([sys.executable, os.path.join(REPO, "launcher", "make_shards.py"), "--input", src,
                            "--output", out, "--samples-per-shard", "4", "--min-frames", "2"],
                           cwd=cwd, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return r.stdout

    first = launch(tmp_path, "data/videos", "data/shards")
    assert "kept 0 finished shard(s) (0 samples), wrote 2 shard(s) (7 samples)" in first
    shards = sorted((tmp_path / "data" / "shards").glob("shard-*"))
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in shards}
    second = launch(tmp_path / "data", "videos", "shards")
    assert "kept 2 finished shard(s) (7 samples), wrote 0 shard(s) (0 samples)" in second
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in shards} == before
