"""The CogVideoX training objective as pure functions.

Schedule: scaled-linear betas, an SNR shift (alpha_bar / (s + (1 - s) alpha_bar)), then a
rescale to zero terminal SNR; the same numbers as diffusers' `CogVideoXDDIMScheduler`.
Objective: v-prediction with plain v-MSE, which equals CogVideoX's official
`mean(1/(1 - alpha_bar) * (x0_hat - x0)^2)` because x0_hat - x0 = -sqrt(1 - alpha_bar) (v_hat - v).

Tensors are in the transformer's layout, [B, F, C, h, w].
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only: the schedule math sits below the config in the layers
    from i2v.config import DiffusionConfig


def alphas_cumprod(cfg: DiffusionConfig) -> torch.Tensor:
    """alpha_bar[t] for t in 0..N-1, float64 (cast per use, as diffusers does)."""
    n = cfg.num_train_timesteps
    betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float64) ** 2
    abar = torch.cumprod(1.0 - betas, dim=0)
    s = cfg.snr_shift_scale
    abar = abar / (s + (1.0 - s) * abar)
    if cfg.rescale_zero_terminal_snr:
        abar = rescale_zero_terminal_snr(abar)
    return abar


def rescale_zero_terminal_snr(abar: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so the last step is pure noise and the first is unchanged."""
    root = abar.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    return root**2


def sample_timesteps(batch: int, cfg: DiffusionConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """t ~ U{t_min..t_max}, int64, on the CPU (the generator's device)."""
    return torch.randint(cfg.t_min, cfg.t_max + 1, (batch,), generator=generator, dtype=torch.int64)


def coefficients(abar: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t), float32, shape [B]."""
    a = abar.to(t.device)[t]
    return a.sqrt().float(), (1.0 - a).sqrt().float()


def _bcast(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return coef.to(like.device, torch.float32).view(-1, *([1] * (like.dim() - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sqrt_a: torch.Tensor, sqrt_1ma: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps, computed in fp32."""
    return _bcast(sqrt_a, x0) * x0.float() + _bcast(sqrt_1ma, x0) * noise.float()


def velocity(x0: torch.Tensor, noise: torch.Tensor, sqrt_a: torch.Tensor, sqrt_1ma: torch.Tensor) -> torch.Tensor:
    """v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0, computed in fp32."""
    return _bcast(sqrt_a, x0) * noise.float() - _bcast(sqrt_1ma, x0) * x0.float()


def pad_image_latents(image_latents: torch.Tensor, frames: int) -> torch.Tensor:
    """[B, 1, C, h, w] -> [B, frames, C, h, w]: the image latent first, zeros after (CogVideoX I2V)."""
    b, one, c, h, w = image_latents.shape
    if one != 1:
        raise ValueError(f"image_latents must have one latent frame, got shape {tuple(image_latents.shape)}")
    pad = image_latents.new_zeros(b, frames - 1, c, h, w)
    return torch.cat([image_latents, pad], dim=1)


def model_input(x_t: torch.Tensor, image_latents: torch.Tensor) -> torch.Tensor:
    """cat([x_t, zero-padded image latents], channel dim): 2C input channels."""
    return torch.cat([x_t, pad_image_latents(image_latents.to(x_t.dtype), x_t.shape[1])], dim=2)


def loss_v_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Plain MSE in fp32 against the v (or epsilon) target."""
    return torch.mean((pred.float() - target.float()) ** 2)


def loss_official(
    v_pred: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, sqrt_a: torch.Tensor, sqrt_1ma: torch.Tensor
) -> torch.Tensor:
    """CogVideoX's form: mean(1/(1 - alpha_bar) * (x0_hat - x0)^2), x0_hat from the predicted v."""
    a, s = _bcast(sqrt_a, x0), _bcast(sqrt_1ma, x0)
    x0_hat = a * x_t.float() - s * v_pred.float()
    return torch.mean((x0_hat - x0.float()) ** 2 / (s**2))


def cfg_dropout(
    prompt_embeds: torch.Tensor,
    image_latents: torch.Tensor,
    empty_prompt_embeds: torch.Tensor | None,
    cfg: DiffusionConfig,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Classifier-free-guidance dropout, each condition with its own probability.

    A dropped prompt becomes the empty prompt's embedding (or zeros when none is stored); a dropped
    image condition becomes zeros. Returns (prompt_embeds, image_latents, text_mask, image_mask) where
    the masks are bool [B], True where the condition was dropped.
    """
    b = prompt_embeds.shape[0]
    drop_text = torch.rand(b, generator=generator) < cfg.text_dropout
    drop_image = torch.rand(b, generator=generator) < cfg.image_dropout
    if drop_text.any():
        empty = (
            empty_prompt_embeds.to(prompt_embeds).expand_as(prompt_embeds)
            if empty_prompt_embeds is not None
            else torch.zeros_like(prompt_embeds)
        )
        keep = drop_text.to(prompt_embeds.device).view(b, 1, 1)
        prompt_embeds = torch.where(keep, empty, prompt_embeds)
    if drop_image.any():
        keep = drop_image.to(image_latents.device).view(b, *([1] * (image_latents.dim() - 1)))
        image_latents = torch.where(keep, torch.zeros_like(image_latents), image_latents)
    return prompt_embeds, image_latents, drop_text, drop_image
