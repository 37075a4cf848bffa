"""Image-to-video sampling with a trained DiT, the VAE decoder and a CogVideoX scheduler.

The loop follows diffusers' `CogVideoXImageToVideoPipeline` step for step (a test runs both from
the same components and generator and compares), so a model trained here samples here exactly
as it will in diffusers after export:

- the image is encoded by the VAE (a posterior sample drawn from `generator`, as the pipeline's
  `retrieve_latents` does; a real VAE's posterior is tight, so the sample is the image), scaled by
  the VAE factor (divided by it for VAEs with `invert_scale_latents`), zero-padded over the latent
  frames and concatenated to the noisy latents along channels;
- initial noise is drawn from `generator` after the image latent, times `init_noise_sigma`;
- classifier-free guidance runs the negative (empty) prompt and the prompt as one batch of two,
  `uncond + g * (cond - uncond)`, on the scheduler's v-prediction;
- 3D RoPE comes from `i2v.model.transformer.rotary_embeddings`; models with an ofs embedding get the pipeline's
  `ofs` (`i2v.sample.setup.sampling_ofs`).

The pieces (transformer, VAE, text encoder, scheduler, `ofs`) come from `i2v.sample.setup`.

Nothing here touches training state, so validation during training can call `sample_video`.
"""

from __future__ import annotations

import fractions
import os

import numpy as np
import torch
from diffusers import CogVideoXDPMScheduler

from i2v.model.encoders import image_latent_scale
from i2v.model.transformer import predict, rotary_embeddings
from i2v.sample.setup import PIPELINE_OFS


@torch.no_grad()
def encode_image(vae, image: torch.Tensor, generator=None, mode: str = "sample", dtype=None) -> torch.Tensor:
    """image [3, H, W] in [-1, 1] -> scaled image latent [1, 1, C, h, w]."""
    vae_dtype = next(vae.parameters()).dtype
    device = next(vae.parameters()).device
    pixels = image.to(device, vae_dtype)[None, :, None]  # [1, 3, 1, H, W]
    dist = vae.encode(pixels).latent_dist
    lat = dist.sample(generator) if mode == "sample" else dist.mode()
    lat = lat.to(dtype or vae_dtype).permute(0, 2, 1, 3, 4)
    return image_latent_scale(vae) * lat


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """[N, f, C, h, w] scaled latents -> frames [N, F, 3, H, W] in [-1, 1]."""
    dtype = next(vae.parameters()).dtype
    lat = latents.permute(0, 2, 1, 3, 4) / float(vae.config.scaling_factor)
    video = vae.decode(lat.to(dtype)).sample  # [N, 3, F, H, W]
    return video.permute(0, 2, 1, 3, 4).float().clamp(-1.0, 1.0)


@torch.no_grad()
def sample_video(transformer, vae, scheduler, image: torch.Tensor, prompt_embeds: torch.Tensor,
                 negative_prompt_embeds: torch.Tensor, num_frames: int, num_inference_steps: int,
                 guidance_scale: float, generator: torch.Generator | None = None, **kwargs) -> torch.Tensor:
    """Sample one clip conditioned on `image` [3, H, W] in [-1, 1] and a prompt embedding [L, D].

    Returns frames [F, 3, H, W] in [-1, 1] (or the final latents [1, f, C, h, w] with
    output="latents"); `sample_videos` with a batch of one, which documents the keyword arguments.
    """
    out = sample_videos(transformer, vae, scheduler, image[None], prompt_embeds[None], negative_prompt_embeds,
                        num_frames, num_inference_steps, guidance_scale,
                        None if generator is None else [generator], **kwargs)
    return out if kwargs.get("output") == "latents" else out[0]


@torch.no_grad()
def sample_videos(
    transformer,
    vae,
    scheduler,
    images: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    num_frames: int,
    num_inference_steps: int,
    guidance_scale: float,
    generators: list[torch.Generator] | None = None,
    *,
    image_latents_mode: str = "sample",
    zero_image: bool = False,
    ofs: float | None = PIPELINE_OFS,
    output: str = "frames",
    progress=None,
) -> torch.Tensor:
    """Sample N clips at once, each conditioned on its image [N, 3, H, W] in [-1, 1] and prompt [N, L, D].

    Returns frames [N, F, 3, H, W] in [-1, 1] (or the final latents [N, f, C, h, w] with
    output="latents"). Clip i draws its randomness from `generators[i]` alone, in the pipeline's
    order (its image latent, then its initial noise), so it comes out as it would sampled by
    itself: a batch only shares the transformer's and the VAE's calls. `image_latents_mode` "sample"
    (the default) encodes the image as the pipeline does; "mode" takes the posterior's mean (a
    diagnostic: no pipeline call reproduces it). `zero_image` replaces the image latents by zeros (the image-dropped
    condition of training) after drawing them, so the noise is the same as without it: an
    ablation that shows what the image condition carries.
    """
    device = next(transformer.parameters()).device
    dtype = prompt_embeds.dtype
    conf = transformer.config
    n = images.shape[0]
    if generators is not None and len(generators) != n:
        raise ValueError(f"sample_videos: {n} images but {len(generators)} generators")
    gens = generators if generators is not None else [None] * n
    guided = guidance_scale > 1.0
    prompt = prompt_embeds.to(device)
    if guided:
        prompt = torch.cat([negative_prompt_embeds.to(device)[None].expand(n, -1, -1), prompt])

    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps

    temporal = int(vae.config.temporal_compression_ratio)
    spatial = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_frames = (num_frames - 1) // temporal + 1
    extra = 0  # CogVideoX 1.5 patches time by patch_size_t: pad at the front, dropped after
    if conf.patch_size_t is not None and latent_frames % conf.patch_size_t:
        extra = conf.patch_size_t - latent_frames % conf.patch_size_t
        latent_frames += extra
    channels = conf.in_channels // 2
    h, w = images.shape[-2] // spatial, images.shape[-1] // spatial

    image_latents, latents = [], []
    for image, gen in zip(images, gens):
        image_latents.append(encode_image(vae, image, gen, image_latents_mode, dtype).to(device))
        gen_device = gen.device if gen is not None else torch.device("cpu")
        latents.append(torch.randn((1, latent_frames, channels, h, w), generator=gen, device=gen_device, dtype=dtype))
    image_latents = torch.cat(image_latents)
    latents = torch.cat(latents).to(device) * scheduler.init_noise_sigma
    if zero_image:
        image_latents = torch.zeros_like(image_latents)
    pad = torch.zeros(n, latent_frames - 1, channels, h, w, device=device, dtype=dtype)
    image_latents = torch.cat([image_latents, pad], dim=1)
    if conf.patch_size_t is not None:
        image_latents = torch.cat([image_latents[:, : image_latents.size(1) % conf.patch_size_t], image_latents], dim=1)

    rotary = rotary_embeddings(conf, latents.size(1), h, w, device)
    use_ofs = ofs if getattr(conf, "ofs_embed_dim", None) is not None else None
    dpm = isinstance(scheduler, CogVideoXDPMScheduler)
    step_generator = generators[0] if generators is not None and n == 1 else generators
    old_x0 = None
    image_input = torch.cat([image_latents] * 2) if guided else image_latents
    for i, t in enumerate(timesteps):
        x = torch.cat([latents] * 2) if guided else latents
        x = scheduler.scale_model_input(x, t)
        x = torch.cat([x, image_input], dim=2)
        v = predict(transformer, x, prompt, t.expand(x.shape[0]), ofs=use_ofs, rotary=rotary).float()
        if guided:
            uncond, cond = v.chunk(2)
            v = uncond + guidance_scale * (cond - uncond)
        if dpm:
            prev = timesteps[i - 1] if i > 0 else None
            latents, old_x0 = scheduler.step(v, old_x0, t, prev, latents, eta=0.0, generator=step_generator,
                                             return_dict=False)
        else:
            latents = scheduler.step(v, t, latents, eta=0.0, generator=step_generator, return_dict=False)[0]
        latents = latents.to(dtype)
        if progress is not None:
            progress.update(1)

    latents = latents[:, extra:]
    if output == "latents":
        return latents
    return decode_latents(vae, latents)[:, :num_frames]


def sample_from_checkpoint(cfg, checkpoint: str, image: torch.Tensor, prompt: str, *, num_frames: int,
                           num_inference_steps: int, guidance_scale: float, seed: int, scheduler: str = "ddim",
                           weights: str = "live") -> torch.Tensor:
    """What `launcher/sample.py` draws: frames [F, 3, H, W] in [-1, 1] from a committed checkpoint.

    The VAE and text encoder are the ones the checkpoint trained with (i2v.data.lineage); `weights` is
    "live" or "ema". The exported pipeline, called as its README.md says, draws the same frames.
    """
    from i2v.sample.setup import load_sampler

    parts = load_sampler(cfg, checkpoint, weights, scheduler)
    prompt_embeds, negative = parts.text([prompt, ""])
    return sample_video(
        parts.transformer, parts.vae, parts.scheduler, image, prompt_embeds, negative,
        num_frames=num_frames, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(seed), ofs=parts.ofs,
    )


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[..., 3, H, W] in [-1, 1] (a clip [F, 3, H, W], or a batch of them) -> uint8 [..., H, W, 3]."""
    x = ((frames.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def save_video(frames: torch.Tensor, path: str, fps: int = 8) -> str:
    """Write frames [F, 3, H, W] in [-1, 1] to .mp4 (H.264 through PyAV) or .gif (Pillow), by extension."""
    ext = os.path.splitext(path)[1].lower()
    pixels = to_uint8(frames)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}{ext}"
    if ext == ".gif":
        from PIL import Image

        images = [Image.fromarray(p) for p in pixels]
        images[0].save(tmp, save_all=True, append_images=images[1:], duration=int(round(1000 / fps)), loop=0)
    elif ext == ".mp4":
        import av

        # yuv420p needs even sides: pad by repeating the last row/column.
        f, hh, ww, _ = pixels.shape
        pixels = np.pad(pixels, ((0, 0), (0, hh % 2), (0, ww % 2), (0, 0)), mode="edge")
        with av.open(tmp, "w", format="mp4") as out:
            stream = out.add_stream("libx264", rate=fractions.Fraction(fps))
            stream.width, stream.height, stream.pix_fmt = pixels.shape[2], pixels.shape[1], "yuv420p"
            stream.options = {"crf": "18"}
            for p in pixels:
                for packet in stream.encode(av.VideoFrame.from_ndarray(p, format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
    else:
        raise ValueError(f"{path}: unsupported video extension {ext!r}; use .mp4 or .gif")
    os.replace(tmp, path)
    return path
