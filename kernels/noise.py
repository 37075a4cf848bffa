"""Noise injection for the I2V training step: one fused pass instead of ~15 launches.

Given x0 [B, F, C, h, w], image latents [B, 1, C, h, w] and per-sample sqrt(alpha_bar),
sqrt(1 - alpha_bar) [B], produce

    model_input = cat([sqrt_a * x0 + sqrt_1ma * eps, image latents zero-padded over F], dim=2)
    target      = sqrt_a * eps - sqrt_1ma * x0        (prediction="v")   or eps   (prediction="epsilon")

with eps drawn from a counter-based stream keyed by (seed, offset), so every rank, micro-batch
and step gets an independent stream and the same key reproduces it.

Backends: "torch" is the plain-PyTorch reference (noise from a torch.Generator keyed by
(seed, offset)); "auto" currently resolves to it.
"""

from __future__ import annotations

import torch

from i2v import diffusion


# Separates the pixel-space condition noise from the latent noise drawn with the same (seed, offset).
_CONDITION_STREAM = 1


def _key(seed: int, offset: int, stream: int = 0) -> int:
    """Mix (seed, offset, stream) into one 63-bit generator seed (splitmix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + offset + stream * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def torch_noise(like: torch.Tensor, seed: int, offset: int, stream: int = 0) -> torch.Tensor:
    """Standard normal noise shaped like `like`, reproducible per (seed, offset), fp32."""
    gen = torch.Generator(device=like.device).manual_seed(_key(seed, offset, stream))
    return torch.randn(like.shape, generator=gen, device=like.device, dtype=torch.float32)


def inject_noise_ref(x0, image_latents, sqrt_alpha, sqrt_one_minus_alpha, noise, prediction="v"):
    """Plain-PyTorch reference with the noise given: (model_input, target) in x0's dtype."""
    x_t = diffusion.add_noise(x0, noise, sqrt_alpha, sqrt_one_minus_alpha)
    if prediction == "v":
        target = diffusion.velocity(x0, noise, sqrt_alpha, sqrt_one_minus_alpha)
    elif prediction == "epsilon":
        target = noise.float()
    else:
        raise ValueError(f"prediction must be 'v' or 'epsilon', got {prediction!r}")
    model_input = diffusion.model_input(x_t, image_latents.float())
    return model_input.to(x0.dtype), target.to(x0.dtype)


def inject_noise(
    x0,
    image_latents,
    sqrt_alpha,
    sqrt_one_minus_alpha,
    seed,
    offset=0,
    prediction="v",
    backend="auto",
    return_noise=False,
):
    """Noisy model input and training target in one call; see the module docstring."""
    if backend not in ("auto", "torch"):
        raise ValueError(f"backend must be 'auto' or 'torch', got {backend!r}")
    noise = torch_noise(x0, seed, offset)
    model_input, target = inject_noise_ref(x0, image_latents, sqrt_alpha, sqrt_one_minus_alpha, noise, prediction)
    if return_noise:
        return model_input, target, noise.to(x0.dtype)
    return model_input, target


def condition_noise_ref(frames, sigma, noise):
    """Plain-PyTorch reference with the noise given: frames + sigma * noise in frames' dtype."""
    sig = sigma.to(frames.device, torch.float32).view(-1, *([1] * (frames.dim() - 1)))
    return (frames.float() + sig * noise.float()).to(frames.dtype)


def condition_noise(frames, sigma, seed, offset=0, backend="auto", return_noise=False):
    """The noisy image condition `frames + sigma * eps` (never `sigma * eps` alone).

    frames [B, ...] in [-1, 1] (typically [B, 3, H, W]); sigma [B] fp32, one per sample.
    Returns a tensor in frames' dtype, and eps too when `return_noise`.
    """
    if backend not in ("auto", "torch"):
        raise ValueError(f"backend must be 'auto' or 'torch', got {backend!r}")
    if frames.dim() < 2:
        raise ValueError(f"frames must be [B, ...] with at least 2 dims, got shape {tuple(frames.shape)}")
    if tuple(sigma.shape) != (frames.shape[0],):
        raise ValueError(f"sigma must have shape [B] = ({frames.shape[0]},), got {tuple(sigma.shape)}")
    noise = torch_noise(frames, seed, offset, _CONDITION_STREAM)
    noisy = condition_noise_ref(frames, sigma, noise)
    if return_noise:
        return noisy, noise.to(frames.dtype)
    return noisy
