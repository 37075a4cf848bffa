"""One micro-batch to a loss: timesteps, CFG dropout, noise injection, the DiT's prediction, v-MSE.

Every random draw of a micro-batch is keyed by (seed, offset), where `offset` is the micro-batch's
global position, not by global RNG state: a resumed run reproduces an uninterrupted one step
for step, and any process that knows the position can rebuild the same inputs.
"""

from __future__ import annotations

import importlib.util

import torch

from i2v.core import diffusion, seeding
from i2v.config import Config
from i2v.kernels.noise import inject_noise
from i2v.model.transformer import predict, rotary_embeddings


def resolve_noise_backend(choice: str, device) -> str:
    """What `kernels.noise: auto` means here: the fused kernel on CUDA, the torch path elsewhere."""
    if choice != "auto":
        return choice
    has_triton = importlib.util.find_spec("triton") is not None
    return "triton" if torch.device(device).type == "cuda" and has_triton else "torch"


def prepare_inputs(batch: dict, abar, cfg: Config, seed: int, offset: int, empty_prompt, device,
                   noise_backend: str = "torch", return_noise: bool = False, patch_size_t: int | None = None) -> dict:
    """Model input, target, prompt and timesteps of one micro-batch; `offset` keys its randomness.

    CogVideoX-1.5 models patch latent frames in groups of `patch_size_t`; a clip whose latent
    length is not a multiple gets its first latent frame repeated in front, which is what the
    pipeline's sampling layout corresponds to (the image latent stays at frame 0).
    """
    x0 = batch["video_latents"].to(device)
    if patch_size_t and x0.shape[1] % patch_size_t:
        pad = patch_size_t - x0.shape[1] % patch_size_t
        x0 = torch.cat([x0[:, :1].expand(-1, pad, -1, -1, -1), x0], dim=1)
    image = batch["image_latents"].to(device)
    prompt = batch["prompt_embeds"].to(device)
    gen = seeding.generator("step", seed, offset)
    t = diffusion.sample_timesteps(x0.shape[0], cfg.diffusion, gen)
    prompt, image, _, _ = diffusion.cfg_dropout(prompt, image, empty_prompt, cfg.diffusion, gen)
    sqrt_a, sqrt_1ma = diffusion.coefficients(abar, t)
    out = inject_noise(x0, image, sqrt_a.to(device), sqrt_1ma.to(device), seed, offset,
                       prediction=cfg.diffusion.prediction, backend=noise_backend, return_noise=return_noise)
    inputs = {"model_input": out[0], "target": out[1], "prompt": prompt, "t": t.to(device),
              "x0": x0, "image": image, "sqrt_a": sqrt_a, "sqrt_1ma": sqrt_1ma}
    if return_noise:
        inputs["noise"] = out[2]
    return inputs


def loss_from_inputs(model, inputs: dict, cfg: Config, rotary_cache: dict | None = None, layout=None) -> torch.Tensor:
    """The transformer's v (or epsilon) MSE on prepared inputs.

    With a sequence-parallel `layout` (i2v.model.parallel) it is this rank's share of it: the shares of
    an SP group add up to the micro-batch's loss.
    """
    module = getattr(model, "module", model)
    _, frames, _, h, w = inputs["model_input"].shape
    cache = rotary_cache if rotary_cache is not None else {}
    if (frames, h, w) not in cache:
        cache[(frames, h, w)] = rotary_embeddings(module.config, frames, h, w, inputs["model_input"].device)
    if layout is not None and layout.sp_size > 1:
        from i2v.model.parallel import sharded_loss

        return sharded_loss(model, inputs, cfg.diffusion.ofs, cache[(frames, h, w)], layout)
    pred = predict(model, inputs["model_input"], inputs["prompt"], inputs["t"], cfg.diffusion.ofs,
                   cache[(frames, h, w)])
    return diffusion.loss_v_mse(pred, inputs["target"])


def training_loss(model, batch: dict, abar, cfg: Config, seed: int, offset: int, empty_prompt, device,
                  noise_backend: str = "torch", rotary_cache: dict | None = None, layout=None) -> torch.Tensor:
    """The loss of one micro-batch: prepare its inputs, run the model."""
    module = getattr(model, "module", model)
    inputs = prepare_inputs(batch, abar, cfg, seed, offset, empty_prompt, device, noise_backend,
                            patch_size_t=module.config.patch_size_t)
    return loss_from_inputs(model, inputs, cfg, rotary_cache, layout)
