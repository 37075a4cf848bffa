"""The committed tiny VAE (configs/tiny-vae, the demo's default): it loads through precompute.vae, fits the
tiny DiT, and keeps the place and palette colour of held-out first frames, which first-frame fidelity needs."""

from __future__ import annotations

import json

import torch

from conftest import REPO
from i2v.config import load_config
from i2v.model.encoders import build_vae
from i2v.data.synthetic import heldout_specs, render
from i2v.sample.evaluation import score_pair
from i2v.sample.sampling import decode_latents, encode_image, to_uint8

VAE = REPO / "configs" / "tiny-vae"


def test_committed_vae_keeps_held_out_first_frames():
    cfg = load_config(str(REPO / "configs" / "tiny.yaml"), [f"precompute.vae.pretrained={VAE}", "precompute.vae.arch={}"])
    vae = build_vae(cfg)
    assert vae.config.latent_channels == cfg.model.arch["out_channels"]  # the tiny DiT's latent channels
    assert json.loads((VAE / "fit.json").read_text())["latent"] == "mode"  # its provenance travels with it

    size = cfg.data.video.width
    kept = 0
    for i, spec in enumerate(heldout_specs(16, seed=0, frames=cfg.data.video.frames, width=size, height=size)):
        image = torch.from_numpy(render(spec, 0, size, size)).permute(2, 0, 1).float() / 127.5 - 1.0
        # The sampler's own round trip: the image latent it conditions on, decoded as it decodes its output.
        frame = to_uint8(decode_latents(vae, encode_image(vae, image, mode="mode"))[0])
        kept += score_pair(i, spec, spec.direction, frame)["first_frame_ok"]
    assert kept >= 15, f"{kept} of 16 held-out first frames kept their place and colour through {VAE}"
