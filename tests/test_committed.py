"""Readers take committed checkpoints only: `i2v.checkpoint.commit.resolve_committed` and the commands
built on it (launcher/sample.py, launcher/export.py, launcher/reshard.py) refuse a directory without
its COMMITTED.json, and a tmp-step-N directory even with one (a save stopped before its rename), with
exit 2 and the path named."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from runs import launch_in_process

from i2v.checkpoint.commit import MARKER, TMP_PREFIX, resolve_committed, tag_for
from i2v.core.errors import CheckpointError


def test_resolve_committed_takes_a_committed_tag_or_the_root_and_nothing_else(tmp_path):
    root = tmp_path / "checkpoints"
    done, half, bare = root / tag_for(4), root / f"{TMP_PREFIX}{tag_for(6)}", root / tag_for(8)
    for d in (done, half, bare):
        d.mkdir(parents=True)
    (done / MARKER).write_text("{}")
    (half / MARKER).write_text("{}")  # the marker is written before the rename that commits
    (root / "latest").write_text(tag_for(4))

    assert resolve_committed(str(done)) == str(done)
    assert resolve_committed(str(root) + "/") == str(done)
    for d in (half, bare):
        with pytest.raises(CheckpointError, match=f"--checkpoint: {d} is not a committed checkpoint"):
            resolve_committed(str(d))
    (root / "latest").write_text(tag_for(8))  # a root whose `latest` names an uncommitted directory
    with pytest.raises(CheckpointError, match=f"--checkpoint: {bare} is not a committed checkpoint"):
        resolve_committed(str(root))


@pytest.fixture(scope="module")
def uncommitted(tmp_path_factory):
    """Two directories no reader may take: a step directory whose save never wrote COMMITTED.json, and one
    still under its tmp- name with the marker already written (a save stopped before its rename). Both hold
    a file, as a half-written save does; the refusal comes before anything in them is read."""
    root = tmp_path_factory.mktemp("uncommitted")
    no_marker = root / "checkpoints" / tag_for(8)
    half = root / "checkpoints" / f"{TMP_PREFIX}{tag_for(8)}"
    for d in (no_marker, half):
        d.mkdir(parents=True)
        (d / "mp_rank_00_model_states.pt").write_bytes(b"half-written")
    (half / MARKER).write_text("{}")
    image = root / "first.png"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(image)
    return {"config": str(REPO / "configs" / "tiny.yaml"), "image": str(image),
            "no_marker": str(no_marker), "tmp": str(half)}


def _command(name, paths, checkpoint, out):
    launcher = [sys.executable, os.path.join(REPO, "launcher", f"{name}.py")]
    if name == "reshard":
        return launcher + ["--checkpoint", checkpoint]
    args = ["--config", paths["config"], "--checkpoint", checkpoint]
    if name == "sample":
        return launcher + args + ["--image", paths["image"], "--prompt", "a red square moving left",
                                  "--out", os.path.join(out, "clip.gif")]
    return launcher + args + ["--out", os.path.join(out, "pipe")]


@pytest.mark.parametrize("which", ["no_marker", "tmp"])
@pytest.mark.parametrize("name", ["sample", "export", "reshard"])
def test_commands_refuse_an_uncommitted_checkpoint(uncommitted, tmp_path, name, which):
    checkpoint = uncommitted[which]
    before = sorted(os.listdir(os.path.dirname(checkpoint)))
    r = launch_in_process(_command(name, uncommitted, checkpoint, str(tmp_path)))
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(
        f"error: --checkpoint: {checkpoint} is not a committed checkpoint")
    assert os.listdir(tmp_path) == []  # no clip, no export
    assert sorted(os.listdir(os.path.dirname(checkpoint))) == before  # no universal/ conversion beside it
