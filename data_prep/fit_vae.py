"""Fit the tiny video VAE on a handful of clips, so that its latents (and the demo's videos) mean something.

A random-init `AutoencoderKLCogVideoX` decodes anything to texture noise. A few minutes of
reconstruction training on synthetic clips (one CPU core) teach it to encode and decode the shapes
as soft blobs in the right places and the right palette colours, which is what the demo needs to
show a DiT learning first-frame-conditioned video. `make tiny-vae` fits the demo's committed VAE,
`configs/tiny-vae`, this way (5000 steps, `--crop-at mixed`).

    python -m i2v.data_prep.fit_vae --config configs/tiny.yaml --clips runs/demo/shards --out runs/demo/vae \
        [--steps 500] [--crop-at random|content|mixed] [--latent mode|sample] [key=value overrides]

`--clips` takes video shards (a directory, .tar path or pattern, as `make_shards` writes them) and
reads them with the training loader, `iter_shard_clips`: the VAE is fitted on exactly the frames,
size and value range that the precompute job will later encode, and corrupt samples are counted
and skipped the same way. The VAE starts from `build_vae` (the seeded `precompute.vae.arch`, or
`precompute.vae.pretrained` to fine-tune one). The loss is pixel MSE plus a small KL on the
posterior, which keeps its means at a sane scale; afterwards
`scaling_factor` is set to 1 / std of the posterior means over the clips, so that scaled latents
have unit variance as the diffusion objective assumes. The result is written with
`save_pretrained` to a temporary directory and renamed into place; load it with
`precompute.vae.pretrained=OUT`. Last, the posterior's std is set to `--posterior-std` (1e-3)
everywhere, means untouched (`tighten_posterior` says why), and fit.json records it before and after.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time

import torch
from tqdm import tqdm

from i2v.config import Config, load_config
from i2v.data.shards import BadSamples, expand_shards
from i2v.data.videos import iter_shard_clips
from i2v.model.encoders import build_vae
from i2v.core import seeding
from i2v.core.errors import ConfigError, DataError

DEFAULT_STEPS = 500
# The error before and after, and the latent spread the scaling factor undoes, are measured on
# this many clips: a full encode + decode of every clip would cost as much as the fit itself.
MEASURE_CLIPS = 16
# Where the crops lie (`--crop-at`): anywhere, around each sample's most salient pixel, or half and half.
CROP_PLACES = ("random", "content", "mixed")
# What the decoder is fitted on: the posterior's mode or a sample of it (`fit`'s docstring says why mode).
LATENTS = ("mode", "sample")


def load_clips(cfg: Config, clips: str) -> torch.Tensor:
    """Every clip of the video shards at `clips`, centred as precompute takes them: [N, 3, F, H, W] in [-1, 1]."""
    urls = expand_shards(clips, key="--clips", allow_pipe=cfg.data.allow_pipe)
    bad = BadSamples(cfg.data.max_bad_fraction, cfg.data.min_samples_for_bad_check)
    out = [c["video"].permute(1, 0, 2, 3) for url in urls
           for c in iter_shard_clips(url, cfg.data.video, bad=bad)]
    if not out:
        raise DataError(f"--clips: no usable clip in {clips}")
    return torch.stack(out)


def trainable_vae(cfg: Config):
    """The VAE `build_vae` gives (seeded arch, or pretrained), in fp32 and with gradients, for fitting."""
    vae = build_vae(cfg).float()
    vae.disable_tiling()
    vae.disable_slicing()
    return vae.requires_grad_(True).train()


@torch.no_grad()
def reconstruction_error(vae, clips: torch.Tensor, batch_size: int = 8) -> float:
    """Mean squared error in [-1, 1] pixels of decode(posterior mode), the path precompute and sampling use."""
    was_training = vae.training
    vae.eval()
    total = 0.0
    for i in range(0, len(clips), batch_size):
        x = clips[i:i + batch_size]
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample
        total += (y - x).pow(2).sum().item()
    vae.train(was_training)
    return total / clips.numel()


@torch.no_grad()
def latent_std(vae, clips: torch.Tensor, batch_size: int = 8) -> float:
    """Std of the posterior means over all clips and positions: the spread the scaling factor undoes."""
    was_training = vae.training
    vae.eval()
    means = torch.cat([vae.encode(clips[i:i + batch_size]).latent_dist.mean.flatten()
                       for i in range(0, len(clips), batch_size)])
    vae.train(was_training)
    return means.std().item()


def posterior_std(vae, clips: torch.Tensor, batch_size: int = 8) -> float:
    """Mean std of the posterior over all clips and positions: how far a sample strays from the mode."""
    with torch.no_grad():
        stds = torch.cat([vae.encode(clips[i:i + batch_size]).latent_dist.std.flatten()
                          for i in range(0, len(clips), batch_size)])
    return stds.mean().item()


@torch.no_grad()
def tighten_posterior(vae, std: float) -> None:
    """Give the encoder a posterior of constant std `std`, its means untouched.

    diffusers' I2V pipeline encodes the first frame with a *sample* of the posterior, and i2v's sampler
    does the same. A real VAE's posterior is tight, so that sample is the image; a fit whose KL pulls
    the log-variance to 0 leaves std ~1 against means spread ~0.26, and sampling buries the image in
    noise. The log-variance is the second half of the encoder's output channels: its weights go to
    zero and its bias to log(std^2). The mode, and so every latent the demo trains on, stays bit for bit.
    """
    conv = vae.encoder.conv_out.conv
    half = conv.out_channels // 2
    conv.weight[half:].zero_()
    conv.bias[half:].fill_(2.0 * math.log(std))


def content_crops(x: torch.Tensor, crop: int, gen: torch.Generator) -> torch.Tensor:
    """A `crop` x `crop` window of each sample of [B, C, F, H, W], centred near its most salient pixel.

    Salience is the distance from the sample's median colour, summed over its frames: in a clip of
    a few objects on a plain background that is where the objects are, and where a small VAE's
    colour errors are. The centre is jittered by up to a quarter of the crop, so that objects are
    also seen near the window's edges.
    """
    b, _, _, height, width = x.shape
    median = x.flatten(2).median(dim=2).values[:, :, None, None, None]
    salience = (x - median).norm(dim=1).sum(dim=1).flatten(1)  # [B, H*W]
    peak = salience.argmax(dim=1)
    jitter = torch.randint(-(crop // 4), crop // 4 + 1, (b, 2), generator=gen)
    out = []
    for i in range(b):
        cy, cx = int(peak[i]) // width + int(jitter[i, 0]), int(peak[i]) % width + int(jitter[i, 1])
        top = min(max(cy - crop // 2, 0), height - crop)
        left = min(max(cx - crop // 2, 0), width - crop)
        out.append(x[i, :, :, top:top + crop, left:left + crop])
    return torch.stack(out)


def fit(vae, clips: torch.Tensor, *, steps: int, batch_size: int = 2, image_batch_size: int = 16,
        image_fraction: float = 0.8, crop: int = 32, crop_at: str = "random", chroma_weight: float = 4.0,
        lr: float = 3e-3, kl_weight: float = 1e-4, latent: str = "mode", seed: int = 0,
        progress: bool = True) -> list[float]:
    """AdamW on MSE(decode(z), x) + chroma_weight * MSE of the error's chroma
    + kl_weight * KL(posterior || N(0, 1)); returns the plain MSE per step.

    z is the posterior's mode (`latent="mode"`), the latent that precompute (`precompute.latents:
    mode`) and the sampler encode with, or a posterior sample (`"sample"`). A random-init encoder's
    posterior std is about 1, several times the spread of its means: a decoder fitted on samples
    for a few hundred steps learns to ignore the small latent differences that carry hue, and
    decodes red, orange and yellow alike (47 of 64 held-out first frames kept their colour after
    700 steps at one seed, against 62 of 64 fitted on the mode).

    The first `image_fraction` of the steps train on single frames drawn from anywhere in the
    clips (`image_batch_size` of them), the rest on whole clips (`batch_size`). Both are cropped to
    `crop` x `crop` pixels (0: uncropped) at a random place, around the object with
    `crop_at="content"` (`content_crops`), or half of each batch each way with `"mixed"`. Crops
    around the object teach hues fast, but the VAE's GroupNorm then sees the object fill far more
    of its input than in a whole frame: a content-crop fit that kept the colour of 63 of 64 held-out
    objects in such crops kept 54 of 64 in whole frames. Random crops see the frame's proportions.
    The VAE is convolutional, so what it learns on small
    single frames holds on whole ones, at a fraction of the cost: a 32 x 32 crop
    of a one-frame input costs about a thirtieth of a 9-frame 64 x 64 clip. The clip steps then
    teach the temporal compression. The chroma term (the error minus its mean over the three
    channels) speeds up what plain MSE learns last: a tiny VAE fits brightness and places within
    a hundred steps and hues only several hundred steps later. The learning rate warms up over the
    first 5% of steps, then follows a cosine to a tenth. Draws come from a generator seeded by `seed`.
    """
    if steps < 1:
        raise ConfigError(f"--steps: is {steps}, expected at least 1")
    if batch_size < 1 or image_batch_size < 1:
        raise ConfigError(f"--batch-size/--image-batch-size: are {batch_size}/{image_batch_size}, expected at least 1")
    if not 0.0 <= image_fraction <= 1.0:
        raise ConfigError(f"--image-fraction: is {image_fraction}, expected 0..1")
    n, frames, height, width = len(clips), clips.shape[2], clips.shape[3], clips.shape[4]
    if latent not in LATENTS:
        raise ConfigError(f"--latent: is {latent!r}, expected one of {', '.join(LATENTS)}")
    if crop_at not in CROP_PLACES:
        raise ConfigError(f"--crop-at: is {crop_at!r}, expected one of {', '.join(CROP_PLACES)}")
    if crop < 0 or crop > min(height, width):
        raise ConfigError(f"--crop: is {crop}, expected 0 (whole frames) up to the frame size {min(height, width)}")
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(seed)
    image_steps = int(steps * image_fraction)
    losses = []
    bar = tqdm(range(steps), desc="fit_vae", unit="step", mininterval=1.0, disable=not progress)
    for step in bar:
        if step < image_steps:
            idx = torch.randint(n, (image_batch_size,), generator=gen)
            t = torch.randint(frames, (image_batch_size,), generator=gen)
            x = clips[idx, :, t].unsqueeze(2)  # [B, 3, 1, H, W]
        else:
            x = clips[torch.randperm(n, generator=gen)[:batch_size]]
        if crop:
            # The first `around` of the batch are cropped around their object, the rest share one random window.
            around = {"content": len(x), "random": 0, "mixed": len(x) // 2}[crop_at]
            parts = [content_crops(x[:around], crop, gen)] if around else []
            if around < len(x):
                top = int(torch.randint(height - crop + 1, (1,), generator=gen))
                left = int(torch.randint(width - crop + 1, (1,), generator=gen))
                parts.append(x[around:, ..., top:top + crop, left:left + crop])
            x = torch.cat(parts)
        dist = vae.encode(x).latent_dist
        y = vae.decode(dist.mode() if latent == "mode" else dist.sample(generator=gen)).sample
        err = y - x
        mse = err.pow(2).mean()
        chroma = (err - err.mean(dim=1, keepdim=True)).pow(2).mean()
        kl = dist.kl().mean() / dist.mean[0].numel()  # per latent element, as the MSE is per pixel
        loss = mse + chroma_weight * chroma + kl_weight * kl
        if not torch.isfinite(loss):
            raise RuntimeError(f"fit_vae: loss became {loss.item()} at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(mse.item())
        bar.set_postfix(on="frames" if step < image_steps else "clips", mse=f"{mse.item():.4f}")
    return losses


def save_atomic(vae, out: str, info: dict | None = None) -> None:
    """`save_pretrained` into a temporary sibling, then rename it to `out` (replacing an older one)."""
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    if info is not None:
        with open(os.path.join(tmp, "fit.json"), "w") as f:
            json.dump(info, f, indent=1, sort_keys=True)
    old = None
    if os.path.exists(out):
        # A directory cannot be renamed over a non-empty one: move the old aside first.
        old = f"{out}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _psnr(mse: float) -> float:
    # Pixels span [-1, 1]: a peak-to-peak range of 2.
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Fit the tiny video VAE on video shards and save it in diffusers format.")
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny.yaml (precompute.vae, data.video)")
    p.add_argument("--clips", default=None, help="video shards: directory, .tar or pattern (default data.video_shards)")
    p.add_argument("--out", required=True, help="output directory for the fitted VAE (diffusers format)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--batch-size", type=int, default=2, help="clips per clip step")
    p.add_argument("--image-batch-size", type=int, default=16, help="single frames per frame step")
    p.add_argument("--crop", type=int, default=32, help="steps train on crops this size (0: whole frames)")
    p.add_argument("--crop-at", choices=CROP_PLACES, default="random",
                   help="where the crops lie: anywhere, around each sample's most salient pixel, or half of "
                        "each batch around it and half anywhere")
    p.add_argument("--chroma-weight", type=float, default=4.0, help="extra weight of the error's chroma (0: plain MSE)")
    p.add_argument("--image-fraction", type=float, default=0.8, help="share of the steps trained on single frames")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--kl-weight", type=float, default=1e-4, help="weight of the per-element KL against the pixel MSE")
    p.add_argument("--latent", choices=LATENTS, default="mode",
                   help="decode the posterior's mode (what precompute and sampling use) or a sample of it")
    p.add_argument("--posterior-std", type=float, default=1e-3,
                   help="after fitting, set the posterior's std to this everywhere (a real VAE's posterior is "
                        "tight; the pipeline encodes first frames with a sample of it); 0 keeps the fitted one")
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    a = p.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    clips_path = a.clips or cfg.data.video_shards
    if not clips_path:
        raise ConfigError("--clips: give the video shards to fit on (or set data.video_shards)")

    clips = load_clips(cfg, clips_path)
    measured = clips[:MEASURE_CLIPS]
    vae = trainable_vae(cfg)
    start = time.time()
    before = reconstruction_error(vae, measured)
    print(f"fit_vae: {len(clips)} clips {tuple(clips.shape[1:])}, {a.steps} steps; "
          f"reconstruction MSE before: {before:.4f}", flush=True)
    fit(vae, clips, steps=a.steps, batch_size=a.batch_size, image_batch_size=a.image_batch_size,
        image_fraction=a.image_fraction, crop=a.crop, crop_at=a.crop_at, chroma_weight=a.chroma_weight, lr=a.lr,
        kl_weight=a.kl_weight, latent=a.latent, seed=seeding.seed("fit-vae", cfg.run.seed))
    after = reconstruction_error(vae, measured)
    std = latent_std(vae, measured)
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.requires_grad_(False).eval()
    fitted_std = posterior_std(vae, measured)
    if a.posterior_std > 0:
        tighten_posterior(vae, a.posterior_std)
    save_atomic(vae, a.out, {
        "clips": len(clips), "measured_on_clips": len(measured), "source": clips_path,
        "seed": cfg.run.seed, "steps": a.steps,
        "batch_size": a.batch_size, "image_batch_size": a.image_batch_size, "image_fraction": a.image_fraction,
        "crop": a.crop, "crop_at": a.crop_at, "chroma_weight": a.chroma_weight,
        "lr": a.lr, "kl_weight": a.kl_weight, "latent": a.latent, "mse_before": before, "mse_after": after, "latent_std": std,
        "scaling_factor": 1.0 / std, "fitted_posterior_std": fitted_std, "posterior_std": posterior_std(vae, measured),
    })
    print(f"fit_vae: reconstruction MSE {before:.4f} -> {after:.4f} (PSNR {_psnr(after):.1f} dB) in "
          f"{time.time() - start:.0f} s; scaling_factor {1.0 / std:.4f}; wrote {a.out}", flush=True)


if __name__ == "__main__":
    from i2v.core.cli import run

    run(main)
