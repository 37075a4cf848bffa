"""Empty captions: make_shards rejects them as `empty caption` unless --allow-empty-captions; kept ones
reach the video loader as "" and precompute encodes them exactly as the stored empty prompt."""

import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch
from safetensors.torch import load as st_load

import clips
from conftest import REPO
from i2v.config import load_config
from i2v.data.latents import load_empty_prompt
from i2v.data.videos import iter_shard_clips
from i2v.data_prep.make_shards import make_shards
from i2v.data_prep.precompute import run as precompute
from i2v.core.errors import DataError

LAUNCHER = str(REPO / "launcher" / "make_shards.py")
CAPTIONS = {"a.mp4": "a red square moving left", "b.mp4": "", "c.mp4": "  \n\t "}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("captions")
    for name, text in CAPTIONS.items():
        clips.encode(d / name, frames=12, width=32, height=32)
        clips.caption(d / name, text)
    return d


def members(tar_path) -> dict:
    with tarfile.open(tar_path) as t:
        return {m.name: t.extractfile(m).read() for m in t}


def test_empty_and_blank_captions_are_rejected_by_reason(videos, tmp_path):
    m = make_shards(str(videos), str(tmp_path / "out"), progress=False)
    assert (m["samples"], m["rejected"]) == (1, 2)
    rejects = [json.loads(line) for line in open(tmp_path / "out" / "rejects.jsonl")]
    assert {os.path.basename(r["path"]): r["reason"] for r in rejects} == {"b.mp4": "empty caption",
                                                                          "c.mp4": "empty caption"}
    assert all("--allow-empty-captions" in r["detail"] for r in rejects)
    # A list's caption column is judged the same way.
    (tmp_path / "list.csv").write_text(f"path,caption\n{videos / 'a.mp4'},\" \"\n")
    m = make_shards(str(tmp_path / "list.csv"), str(tmp_path / "csv"), progress=False)
    assert (m["samples"], m["rejected"]) == (0, 1)
    assert json.loads((tmp_path / "csv" / "rejects.jsonl").read_text())["reason"] == "empty caption"


def test_a_caption_that_is_not_text_is_an_error_naming_the_line(videos, tmp_path):
    (tmp_path / "list.jsonl").write_text(json.dumps({"path": str(videos / "a.mp4"), "caption": 7}) + "\n")
    with pytest.raises(DataError, match=r"list\.jsonl:1: caption must be a string, got int"):
        make_shards(str(tmp_path / "list.jsonl"), str(tmp_path / "out"), progress=False)


def test_the_flag_keeps_them_and_precompute_encodes_them_as_the_empty_prompt(videos, tmp_path):
    shards, latents = tmp_path / "shards", tmp_path / "latents"
    # A rerun with the flag over a run without it redoes the shard: the setting is part of its record.
    assert make_shards(str(videos), str(shards), progress=False)["samples"] == 1
    r = subprocess.run([sys.executable, LAUNCHER, "--input", str(videos), "--output", str(shards),
                        "--allow-empty-captions"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "3 samples in 1 shard(s), 0 rejected" in r.stdout
    files = members(shards / "shard-000000.tar")
    assert [files[f"00000000{i}.txt"] for i in range(3)] == [b"a red square moving left", b"", b""]

    clips_read = list(iter_shard_clips(str(shards / "shard-000000.tar"), load_config(
        str(REPO / "configs" / "tiny.yaml"), ["data.video.height=32", "data.video.width=32"]).data.video))
    assert [c["caption"] for c in clips_read] == ["a red square moving left", "", ""]

    cfg = load_config(str(REPO / "configs" / "tiny.yaml"),
                      [f"data.video_shards={shards}", f"data.latent_shards={latents}",
                       "data.video.height=32", "data.video.width=32"])
    precompute(cfg, progress=False)
    empty = load_empty_prompt(str(latents))
    (out,) = [p for p in os.listdir(latents) if p.endswith(".tar")]
    embeds = {name.split(".")[0]: st_load(data)["prompt_embeds"]
              for name, data in members(latents / out).items() if name.endswith(".latents.safetensors")}
    assert sorted(embeds) == ["000000000", "000000001", "000000002"]
    assert torch.equal(embeds["000000001"], empty) and torch.equal(embeds["000000002"], empty)
    assert not torch.allclose(embeds["000000000"], empty)


def test_the_flag_is_in_the_help():
    r = subprocess.run([sys.executable, LAUNCHER, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--allow-empty-captions" in r.stdout and "empty prompt" in r.stdout
