"""The sampler matches diffusers' CogVideoXImageToVideoPipeline built from the same components,
uses the training schedule, and writes readable .mp4 / .gif files."""

from __future__ import annotations

import sys

import av
import numpy as np
import pytest
import torch
from diffusers import CogVideoXImageToVideoPipeline
from PIL import Image

from i2v.config import load_config
from i2v.model import encoders
from i2v.core.diffusion import alphas_cumprod
from i2v.model.transformer import build_transformer
from i2v.sample.sampling import sample_video, sample_videos, save_video
from i2v.sample.setup import build_scheduler

from conftest import REPO
from runs import launch_in_process
from random_vae import RANDOM_VAE

CONFIG = str(REPO / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def parts():
    cfg = load_config(CONFIG)
    transformer = build_transformer(cfg.model, seed=0).eval()
    # The random init zeroes the output layer (predicts 0); give it weights so the loop has work to do.
    with torch.no_grad():
        transformer.proj_out.weight.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(1))
        transformer.proj_out.bias.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(2))
    text = encoders.build_text_encoder(cfg)
    prompt, negative = text(["a red square moving left", ""])
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    return cfg, transformer, text, prompt, negative, image


def _pipeline(cfg, transformer, text, vae, kind):
    pipe = CogVideoXImageToVideoPipeline(tokenizer=text.tokenizer, text_encoder=text.model, vae=vae,
                                         transformer=transformer, scheduler=build_scheduler(cfg.diffusion, kind))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kind,guidance,invert", [("ddim", 6.0, False), ("dpm", 6.0, False), ("ddim", 1.0, True)])
def test_matches_diffusers_pipeline(parts, kind, guidance, invert):
    cfg, transformer, text, prompt, negative, image = parts
    over = [*RANDOM_VAE, "precompute.vae.arch.invert_scale_latents=true"] if invert else []
    vae = encoders.build_vae(load_config(CONFIG, over))
    ours = sample_video(transformer, vae, build_scheduler(cfg.diffusion, kind), image, prompt, negative,
                        num_frames=9, num_inference_steps=3, guidance_scale=guidance,
                        generator=torch.Generator().manual_seed(7), output="latents")
    ref = _pipeline(cfg, transformer, text, vae, kind)(
        image=image[None] * 0.5 + 0.5, prompt_embeds=prompt[None], negative_prompt_embeds=negative[None], height=64, width=64,
        num_frames=9, num_inference_steps=3, guidance_scale=guidance, generator=torch.Generator().manual_seed(7),
        output_type="latent", return_dict=False)[0]
    assert ours.shape == ref.shape == (1, 3, 4, 16, 16)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    # A different seed gives a different sample: the generator really drives the loop.
    other = sample_video(transformer, vae, build_scheduler(cfg.diffusion, kind), image, prompt, negative,
                         num_frames=9, num_inference_steps=3, guidance_scale=guidance,
                         generator=torch.Generator().manual_seed(8), output="latents")
    assert not torch.allclose(other, ours)


def test_zero_image_removes_the_image_condition_only(parts):
    cfg, transformer, text, prompt, negative, image = parts
    vae = encoders.build_vae(cfg)

    def latents(img, **kw):
        return sample_video(transformer, vae, build_scheduler(cfg.diffusion), img, prompt, negative, num_frames=9,
                            num_inference_steps=2, guidance_scale=6.0, generator=torch.Generator().manual_seed(4),
                            output="latents", **kw)

    other = -image
    assert not torch.allclose(latents(image), latents(other))  # by default the image steers the sample
    zeroed = latents(image, zero_image=True)
    torch.testing.assert_close(zeroed, latents(other, zero_image=True), atol=0, rtol=0)
    assert not torch.allclose(zeroed, latents(image))


@pytest.mark.parametrize("kind", ["ddim", "dpm"])
def test_a_batch_samples_each_clip_as_it_samples_alone(parts, kind):
    """The evaluation samples its pairs in batches: clip i of a batch is the clip sampled by itself with
    generators[i], whatever else is in the batch (dpm draws step noise per clip too)."""
    cfg, transformer, text, prompt, negative, image = parts
    vae = encoders.build_vae(cfg)
    images = torch.stack([image, -image, image.flip(-1)])
    prompts = text(["a red square moving left", "a blue circle moving up", "a red square moving left"])
    seeds = [11, 12, 13]
    run = dict(num_frames=9, num_inference_steps=3, guidance_scale=6.0)
    batch = sample_videos(transformer, vae, build_scheduler(cfg.diffusion, kind), images, prompts, negative,
                          generators=[torch.Generator().manual_seed(s) for s in seeds], **run)
    assert batch.shape == (3, 9, 3, 64, 64)
    for i, s in enumerate(seeds):
        alone = sample_video(transformer, vae, build_scheduler(cfg.diffusion, kind), images[i], prompts[i], negative,
                             generator=torch.Generator().manual_seed(s), **run)
        torch.testing.assert_close(batch[i], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batch[0], batch[2])  # same image and prompt, other seed: another clip


def test_decoded_frames_match_the_pipeline(parts):
    cfg, transformer, text, prompt, negative, image = parts
    vae = encoders.build_vae(cfg)
    frames = sample_video(transformer, vae, build_scheduler(cfg.diffusion), image, prompt, negative,
                          num_frames=9, num_inference_steps=2, guidance_scale=6.0,
                          generator=torch.Generator().manual_seed(5))
    ref = _pipeline(cfg, transformer, text, vae, "ddim")(
        image=image[None] * 0.5 + 0.5, prompt_embeds=prompt[None], negative_prompt_embeds=negative[None], height=64, width=64,
        num_frames=9, num_inference_steps=2, guidance_scale=6.0, generator=torch.Generator().manual_seed(5),
        output_type="pt", return_dict=False)[0]
    assert frames.shape == (9, 3, 64, 64) and frames.min() >= -1 and frames.max() <= 1
    torch.testing.assert_close(frames * 0.5 + 0.5, ref[0], atol=1e-5, rtol=1e-5)


def test_scheduler_uses_the_training_schedule():
    for snr in (1.0, 3.0):
        cfg = load_config(CONFIG, [f"diffusion.snr_shift_scale={snr}"])
        sched = build_scheduler(cfg.diffusion)
        torch.testing.assert_close(sched.alphas_cumprod.double(), alphas_cumprod(cfg.diffusion), atol=1e-12, rtol=0)
        assert sched.config.prediction_type == "v_prediction"


def _ramp(frames=5, h=32, w=48):
    t = torch.linspace(-1, 1, frames).view(frames, 1, 1, 1)
    x = torch.linspace(-1, 1, w).view(1, 1, 1, w)
    return (0.5 * t + 0.5 * x).expand(frames, 3, h, w).clone()


def test_save_video_mp4_and_gif(tmp_path):
    frames = _ramp()
    expected = ((frames.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    save_video(frames, str(tmp_path / "a.mp4"), fps=8)
    with av.open(str(tmp_path / "a.mp4")) as c:
        got = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]).astype(np.float64)
    assert got.shape == (5, 32, 48, 3)
    assert np.abs(got - expected).mean() < 4.0  # lossy H.264 of a smooth ramp
    save_video(frames, str(tmp_path / "a.gif"))
    with Image.open(tmp_path / "a.gif") as g:
        assert g.n_frames == 5 and g.size == (48, 32)
    save_video(_ramp(h=31, w=47), str(tmp_path / "odd.mp4"))  # yuv420p needs even sides: padded
    with av.open(str(tmp_path / "odd.mp4")) as c:
        assert c.streams.video[0].codec_context.width == 48
    with pytest.raises(ValueError, match=r"\.avi"):
        save_video(frames, str(tmp_path / "a.avi"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gif", "a.mp4", "odd.mp4"]  # no temp files left


def test_cogvideox_15_style_model_matches_the_pipeline():
    """patch_size_t (latent frames padded in front, dropped after), ofs = 2.0, inverted image scale."""
    cfg = load_config(CONFIG, ["model.arch.patch_size_t=2", "model.arch.ofs_embed_dim=32", *RANDOM_VAE,
                               "precompute.vae.arch.invert_scale_latents=true"])
    transformer = build_transformer(cfg.model, seed=0).eval()
    with torch.no_grad():
        transformer.proj_out.weight.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(1))
    text, vae = encoders.build_text_encoder(cfg), encoders.build_vae(cfg)
    prompt, negative = text(["a blue circle moving right", ""])
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    ours = sample_video(transformer, vae, build_scheduler(cfg.diffusion, "dpm"), image, prompt, negative,
                        num_frames=9, num_inference_steps=3, guidance_scale=6.0,
                        generator=torch.Generator().manual_seed(7))
    ref = _pipeline(cfg, transformer, text, vae, "dpm")(
        image=image[None] * 0.5 + 0.5, prompt_embeds=prompt[None], negative_prompt_embeds=negative[None],
        height=64, width=64, num_frames=9, num_inference_steps=3, guidance_scale=6.0,
        generator=torch.Generator().manual_seed(7), output_type="pt", return_dict=False)[0]
    assert ours.shape == (9, 3, 64, 64)
    torch.testing.assert_close(ours * 0.5 + 0.5, ref[0], atol=1e-5, rtol=1e-5)


def test_sample_launcher_reports_user_errors_in_one_line(tmp_path):
    png = tmp_path / "f.png"
    Image.new("RGB", (80, 64), (200, 30, 30)).save(png)
    base = [sys.executable, str(REPO / "launcher" / "sample.py"), "--config", CONFIG, "--prompt", "a red square"]
    cases = [
        (["--checkpoint", str(tmp_path), "--image", str(png), "--out", str(tmp_path / "x.avi")], "error: --out"),
        (["--checkpoint", str(tmp_path / "none"), "--image", str(png), "--out", str(tmp_path / "x.gif")],
         "error: --checkpoint: directory not found"),
        (["--checkpoint", str(tmp_path), "--image", str(tmp_path / "missing.png"), "--out", str(tmp_path / "x.gif")],
         "error: --image: file not found"),
    ]
    for args, message in cases:
        proc = launch_in_process(base + args)
        assert proc.returncode == 2 and proc.stderr.startswith(message), proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
