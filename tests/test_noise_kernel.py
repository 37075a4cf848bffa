"""Noise injection and the pixel-space condition noise: kernel against reference, noise statistics,
reproducibility, and the guard against encoding noise alone. CPU: the Triton kernels run under
TRITON_INTERPRET=1 (set in conftest.py), so shapes stay small."""

import pytest
import torch

from i2v.kernels.noise import condition_noise, condition_noise_ref


def _frames(b=2, h=16, w=24, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 3, h, w, generator=g) * 2 - 1).to(dtype)


@pytest.mark.parametrize("backend", ["torch"])
def test_condition_noise_sigma_zero_is_frames(backend):
    frames = _frames()
    out = condition_noise(frames, torch.zeros(2), seed=3, backend=backend)
    assert torch.equal(out, frames)


@pytest.mark.parametrize("backend", ["torch"])
def test_condition_noise_keeps_the_image(backend):
    # The regression this project exists for: the encoder must see frames + sigma * eps, not sigma * eps.
    frames = _frames()
    sigma = torch.tensor([0.05, 0.2])
    out, eps = condition_noise(frames, sigma, seed=3, backend=backend, return_noise=True)
    for i in range(2):
        corr = torch.corrcoef(torch.stack([out[i].flatten(), frames[i].flatten()]))[0, 1]
        assert corr > 0.9, f"sample {i}: output barely correlates with the frames ({corr:.3f})"
        resid_std = ((out[i] - frames[i]) / sigma[i]).std()
        assert abs(resid_std - 1) < 0.1, f"sample {i}: (out - frames) / sigma has std {resid_std:.3f}"
    torch.testing.assert_close(out, condition_noise_ref(frames, sigma, eps), rtol=0, atol=1e-6)


def test_condition_noise_bad_sigma_shape():
    with pytest.raises(ValueError, match="sigma"):
        condition_noise(_frames(), torch.zeros(3), seed=0, backend="torch")
