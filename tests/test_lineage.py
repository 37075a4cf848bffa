"""Encoder identities (i2v.data.lineage): a recorded VAE is adopted when the config leaves it unset, a moved copy is
the same VAE, a changed or missing one is refused naming it, and an inline one is known by arch and seed."""

from __future__ import annotations

import os
import shutil

import pytest

from conftest import REPO
from i2v.data import lineage
from i2v.config import load_config
from i2v.core.errors import ConfigError
from random_vae import RANDOM_VAE

TINY = str(REPO / "configs" / "tiny.yaml")
UNSET_VAE = ["precompute.vae.pretrained=null", "precompute.vae.arch={}"]


def _recorded(vae_dir) -> dict:
    return {"vae": lineage.identity(load_config(TINY, [f"precompute.vae.pretrained={vae_dir}"]), "vae")}


def test_an_unset_vae_is_taken_from_the_record_and_a_moved_copy_is_the_same(tmp_path):
    vae = tmp_path / "vae"
    shutil.copytree(REPO / "configs" / "tiny-vae", vae)
    recorded = _recorded(vae)
    cfg = load_config(TINY, UNSET_VAE)
    lines = lineage.adopt(cfg, recorded, "manifest.json", "the latents")
    assert cfg.precompute.vae.pretrained == str(vae) and cfg.precompute.vae.arch == {}
    assert lines == [f"precompute.vae: {lineage.describe(recorded['vae'])}, from manifest.json"]

    moved = tmp_path / "elsewhere"
    shutil.copytree(vae, moved)
    named = load_config(TINY, [f"precompute.vae.pretrained={moved}"])
    assert "as recorded in" in lineage.adopt(named, recorded, "manifest.json", "the latents")[0]


def test_a_changed_or_missing_recorded_vae_is_refused(tmp_path):
    vae = tmp_path / "vae"
    shutil.copytree(REPO / "configs" / "tiny-vae", vae)
    recorded = _recorded(vae)
    weights = vae / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight: same size, new mtime
    weights.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=rf"precompute\.vae: {vae} has changed since the latents were made"):
        lineage.adopt(load_config(TINY, UNSET_VAE), recorded, "manifest.json", "the latents")
    shutil.rmtree(vae)
    with pytest.raises(ConfigError, match=rf"made with {vae} \(recorded in manifest.json\), which no longer exists"):
        lineage.adopt(load_config(TINY, UNSET_VAE), recorded, "manifest.json", "the latents")


def test_an_inline_vae_is_known_by_arch_and_seed():
    made = load_config(TINY, [*RANDOM_VAE, "run.seed=3"])
    recorded = {"vae": lineage.identity(made, "vae")}
    assert recorded["vae"]["seed"] == 3
    cfg = load_config(TINY, UNSET_VAE)  # run.seed 0: the seed must come from the record, not from the run
    lineage.adopt(cfg, recorded, "ckpt", "the checkpoint's latents")
    assert cfg.precompute.vae.arch == made.precompute.vae.arch and cfg.precompute.vae.seed == 3
    assert lineage.same(lineage.identity(cfg, "vae"), recorded["vae"])
    with pytest.raises(ConfigError, match=r"names an inline arch, seed 0 .* made with an inline arch, seed 3"):
        lineage.adopt(load_config(TINY, RANDOM_VAE), recorded, "ckpt", "the checkpoint's latents")


def test_the_digest_rereads_only_changed_files(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "a.bin").write_bytes(b"x" * 100)
    (d / "README.md").write_text("notes do not count")
    first = lineage.files_digest([str(d)])
    assert list(first["files"]) == ["a.bin"]
    os.utime(d / "a.bin", ns=(1, 1))
    (d / "a.bin").write_bytes(b"y" * 100)  # new contents and mtime: read again
    assert lineage.files_digest([str(d)], first)["sha256"] != first["sha256"]
