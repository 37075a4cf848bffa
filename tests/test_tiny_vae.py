"""The committed tiny VAE (configs/tiny-vae, the demo's default): it loads through precompute.vae, fits the
tiny DiT, and keeps the place and palette colour of held-out first frames, which first-frame fidelity needs."""

from __future__ import annotations

import json

import numpy as np
import torch

from conftest import REPO
from i2v.config import load_config
from i2v.data_prep.encoders import build_vae
from i2v.data_prep.synthetic import heldout_specs, render
from i2v.evaluation import CENTROID_FRACTION_OF_WIDTH, track, true_centroids

VAE = REPO / "configs" / "tiny-vae"


def test_committed_vae_keeps_held_out_first_frames():
    cfg = load_config(str(REPO / "configs" / "tiny.yaml"), [f"precompute.vae.pretrained={VAE}", "precompute.vae.arch={}"])
    vae = build_vae(cfg)
    assert vae.config.latent_channels == cfg.model.arch["out_channels"]  # the tiny DiT's latent channels
    assert json.loads((VAE / "fit.json").read_text())["latent"] == "mode"  # its provenance travels with it

    size = cfg.data.video.width
    kept = 0
    specs = heldout_specs(16, seed=0, frames=cfg.data.video.frames, width=size, height=size)
    with torch.no_grad():
        for spec in specs:
            frame = render(spec, 0, size, size)
            x = torch.from_numpy(frame).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1.0
            y = vae.decode(vae.encode(x).latent_dist.mode()).sample[0, :, 0].clamp(-1, 1)
            found = track(((y + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
            truth = true_centroids(spec, 1, size, size)[0]
            kept += (found is not None and found.colour == spec.colour
                     and np.hypot(found.x - truth[0], found.y - truth[1]) <= CENTROID_FRACTION_OF_WIDTH * size)
    assert kept >= 15, f"{kept} of 16 held-out first frames kept their place and colour through {VAE}"
