import pytest
import torch
from diffusers import CogVideoXDDIMScheduler
from diffusers.pipelines.cogvideo.pipeline_cogvideox_image2video import get_resize_crop_region_for_grid

from i2v.core import diffusion
from i2v.config import DiffusionConfig
from i2v.model.transformer import _resize_crop_region


def scheduler_for(cfg: DiffusionConfig) -> CogVideoXDDIMScheduler:
    return CogVideoXDDIMScheduler(
        num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
        beta_schedule="scaled_linear", snr_shift_scale=cfg.snr_shift_scale,
        rescale_betas_zero_snr=cfg.rescale_zero_terminal_snr, prediction_type="v_prediction",
    )


@pytest.mark.parametrize("shift,rescale", [(1.0, True), (3.0, True), (3.0, False)])
def test_schedule_equals_diffusers(shift, rescale):
    cfg = DiffusionConfig(snr_shift_scale=shift, rescale_zero_terminal_snr=rescale)
    ours = diffusion.alphas_cumprod(cfg)
    theirs = scheduler_for(cfg).alphas_cumprod
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, theirs.to(torch.float64), rtol=0, atol=1e-12)
    if rescale:
        assert ours[-1].item() == pytest.approx(0.0, abs=1e-12)  # zero terminal SNR


def test_add_noise_and_velocity_equal_diffusers():
    cfg = DiffusionConfig(snr_shift_scale=3.0)
    sched = scheduler_for(cfg)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 4, 8, 8, generator=g)
    noise = torch.randn(4, 3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    sa, s1 = diffusion.coefficients(diffusion.alphas_cumprod(cfg), t)
    torch.testing.assert_close(diffusion.add_noise(x0, noise, sa, s1), sched.add_noise(x0, noise, t), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(diffusion.velocity(x0, noise, sa, s1), sched.get_velocity(x0, noise, t), rtol=1e-6, atol=1e-6)


def test_v_mse_equals_official_loss():
    cfg = DiffusionConfig()
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 2, 4, 4, 4, generator=g), torch.randn(3, 2, 4, 4, 4, generator=g)
    t = torch.tensor([5, 400, 998])  # alpha_bar < 1 everywhere, so 1/(1 - alpha_bar) is finite
    sa, s1 = diffusion.coefficients(diffusion.alphas_cumprod(cfg), t)
    x_t = diffusion.add_noise(x0, noise, sa, s1)
    v = diffusion.velocity(x0, noise, sa, s1)
    v_pred = v + 0.3 * torch.randn(v.shape, generator=g)
    # The official per-element weight 1/(1 - alpha_bar) cancels against x0_hat - x0 = -sqrt(1 - alpha_bar)(v_hat - v).
    assert diffusion.loss_official(v_pred, x_t, x0, sa, s1).item() == pytest.approx(
        diffusion.loss_v_mse(v_pred, v).item(), rel=1e-5)
    # and the exact prediction gives zero loss in both forms
    assert diffusion.loss_official(v, x_t, x0, sa, s1).item() < 1e-8


def test_model_input_concatenates_zero_padded_image_latents():
    x_t = torch.randn(2, 5, 4, 3, 3)
    image = torch.randn(2, 1, 4, 3, 3)
    mi = diffusion.model_input(x_t, image)
    assert mi.shape == (2, 5, 8, 3, 3)
    assert torch.equal(mi[:, :, :4], x_t)
    assert torch.equal(mi[:, :1, 4:], image)
    assert torch.count_nonzero(mi[:, 1:, 4:]) == 0


def test_timesteps_cover_configured_range():
    cfg = DiffusionConfig(t_min=100, t_max=199)
    t = diffusion.sample_timesteps(20000, cfg, torch.Generator().manual_seed(0))
    assert t.min() == 100 and t.max() == 199 and t.dtype == torch.int64


def test_cfg_dropout_rates_and_replacements():
    cfg = DiffusionConfig(text_dropout=0.3, image_dropout=0.1)
    n = 20000
    prompt = torch.ones(n, 2, 3)
    image = torch.ones(n, 1, 2, 2, 2)
    empty = torch.full((2, 3), 7.0)
    p, i, dt, di = diffusion.cfg_dropout(prompt, image, empty, cfg, torch.Generator().manual_seed(0))
    assert abs(dt.float().mean().item() - 0.3) < 0.02 and abs(di.float().mean().item() - 0.1) < 0.01
    assert torch.all(p[dt] == 7.0) and torch.all(p[~dt] == 1.0)
    assert torch.all(i[di] == 0.0) and torch.all(i[~di] == 1.0)
    # the two conditions are dropped independently
    both = (dt & di).float().mean().item()
    assert abs(both - 0.03) < 0.01


@pytest.mark.parametrize("grid,base", [((4, 4), (8, 8)), ((30, 45), (60, 90)), ((6, 3), (8, 10))])
def test_rotary_crop_region_matches_pipeline(grid, base):
    assert _resize_crop_region(grid, base[1], base[0]) == get_resize_crop_region_for_grid(grid, base[1], base[0])
