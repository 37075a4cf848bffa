"""fit_vae: a short fit really lowers the reconstruction error, and the saved VAE loads through build_vae."""

from __future__ import annotations

import json

import torch

from conftest import REPO
from i2v.config import load_config
from i2v.model.encoders import build_vae
from i2v.data_prep.fit_vae import latent_std, load_clips, main, posterior_std, reconstruction_error
from i2v.data_prep.make_shards import make_shards
from i2v.data.synthetic import make_clips
from random_vae import RANDOM_VAE

# 32 x 32 clips keep the fit cheap on one thread; the VAE starts from a random init of the tiny shape.
SMALL = ["data.video.height=32", "data.video.width=32", *RANDOM_VAE]


def test_fit_lowers_reconstruction_error_and_saves_a_loadable_vae(tmp_path):
    make_clips(str(tmp_path / "clips"), 6, seed=3, frames=12, width=32, height=32)
    make_shards(str(tmp_path / "clips"), str(tmp_path / "shards"), samples_per_shard=3, workers=1, progress=False)
    out = tmp_path / "vae"
    config = str(REPO / "configs" / "tiny.yaml")
    main(["--config", config, "--clips", str(tmp_path / "shards"), "--out", str(out), "--steps", "60",
          "--image-batch-size", "8", "--batch-size", "2", *SMALL])

    assert sorted(p.name for p in tmp_path.iterdir()) == ["clips", "shards", "vae"]  # no temporary left behind
    arch_cfg = load_config(config, SMALL)
    clips = load_clips(arch_cfg, str(tmp_path / "shards"))
    assert clips.shape == (6, 3, 9, 32, 32)
    random_err = reconstruction_error(build_vae(arch_cfg), clips)

    cfg = load_config(config, SMALL + [f"precompute.vae.pretrained={out}", "precompute.vae.arch={}"])
    vae = build_vae(cfg)
    fitted_err = reconstruction_error(vae, clips)
    info = json.loads((out / "fit.json").read_text())
    assert abs(info["mse_before"] - random_err) < 1e-4  # the fit started from build_vae's seeded init
    assert abs(info["mse_after"] - fitted_err) < 1e-4  # and what was saved is what was fitted
    assert info["latent"] == "mode"  # the decoder was fitted on the latent precompute and sampling use
    assert fitted_err < 0.3 * random_err, (random_err, fitted_err)
    # The posterior is tightened after the fit (the pipeline encodes first frames with a sample of it).
    assert info["fitted_posterior_std"] > 0.1 and abs(info["posterior_std"] - 1e-3) < 1e-6
    assert abs(posterior_std(vae, clips) - 1e-3) < 1e-6

    # The scaling factor written is 1 / std of this VAE's posterior means: scaled latents have unit std.
    written = json.loads((out / "config.json").read_text())["scaling_factor"]
    assert vae.config.scaling_factor == written == info["scaling_factor"]
    assert abs(written * latent_std(vae, clips) - 1.0) < 1e-3
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training
    assert torch.isfinite(torch.tensor(written)) and written != 1.0


def test_content_crops_hold_the_object_wherever_it_is():
    """`--crop-at content` windows lie inside the frame and hold the one bright object, even in a corner."""
    from i2v.data_prep.fit_vae import content_crops

    x = torch.full((3, 3, 2, 64, 64), -0.6)  # [B, C, F, H, W]: a flat background
    corners = [(2, 2), (30, 40), (60, 61)]  # object top-left per sample: near a corner, inside, at the far edge
    for i, (y, xx) in enumerate(corners):
        x[i, :, :, y:y + 3, xx:xx + 3] = torch.tensor([1.0, -1.0, 0.5])[:, None, None, None]
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):  # the jitter differs per draw: every draw must still hold the whole object
        crops = content_crops(x, 16, gen)
        assert crops.shape == (3, 3, 2, 16, 16)
        object_pixels = (crops[:, 0] > 0.9).flatten(1).sum(dim=1)
        assert object_pixels.tolist() == [3 * 3 * 2] * 3
