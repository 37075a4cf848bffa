"""Noise injection and the pixel-space condition noise: kernel against reference, noise statistics,
reproducibility, the documented Philox stream, and the guard against encoding noise alone.
CPU: the Triton kernels run under TRITON_INTERPRET=1 (set in conftest.py), so shapes stay small."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from scipy import stats

from i2v.kernels import noise as noise_mod
from i2v.kernels.noise import condition_noise, condition_noise_ref, inject_noise, inject_noise_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}  # relative spacing of values in [1, 2)


def _inputs(shape, dtype=torch.float32, img_dtype=None, seed=0):
    b, f, c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g).to(dtype)
    img = torch.randn((b, 1, c, h, w), generator=g).to(img_dtype or dtype)
    sqrt_a = torch.rand(b, generator=g)
    sqrt_1ma = (1 - sqrt_a**2).sqrt()
    return x0, img, sqrt_a, sqrt_1ma


def _frames(b=2, h=16, w=24, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 3, h, w, generator=g) * 2 - 1).to(dtype)


def _eps(shape, seed=0, offset=0, backend="triton"):
    """The kernel's noise for a shape, fp32 (zeros in, so nothing but the noise is computed)."""
    b, f, c, h, w = shape
    x0, img = torch.zeros(shape), torch.zeros(b, 1, c, h, w)
    return inject_noise(x0, img, torch.zeros(b), torch.ones(b), seed, offset, backend=backend, return_noise=True)[2]


def _corr(a, b):
    return float(np.corrcoef(np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel())[0, 1])


# --------------------------------------------------------------------------- kernel = reference

# h * w = 35 and 63 are not multiples of any block; C = 3 and F = 1 are the odd cases.
SHAPES = [(1, 1, 3, 5, 7), (2, 3, 4, 9, 7), (3, 2, 16, 6, 10)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("prediction", ["v", "epsilon"])
def test_fp32_matches_reference_on_own_noise(shape, prediction):
    x0, img, sqrt_a, sqrt_1ma = _inputs(shape)
    model_input, target, eps = inject_noise(
        x0, img, sqrt_a, sqrt_1ma, seed=11, offset=3, prediction=prediction, backend="triton", return_noise=True
    )
    ref_input, ref_target = inject_noise_ref(x0, img, sqrt_a, sqrt_1ma, eps, prediction)
    assert model_input.shape == (shape[0], shape[1], 2 * shape[2], *shape[3:]) and model_input.dtype == torch.float32
    torch.testing.assert_close(model_input, ref_input, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(target, ref_target, rtol=1e-6, atol=1e-6)
    # The image half is a copy, so exact: the image latent in frame 0, zeros after.
    assert torch.equal(model_input[:, :1, shape[2]:], img)
    assert not model_input[:, 1:, shape[2]:].any()
    if prediction == "epsilon":
        assert torch.equal(target, eps)


@pytest.mark.parametrize("shape", SHAPES[:2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("img_dtype", [None, torch.float32])
def test_16bit_matches_reference(shape, dtype, img_dtype):
    x0, img, sqrt_a, sqrt_1ma = _inputs(shape, dtype, img_dtype)
    model_input, target, eps = inject_noise(
        x0, img, sqrt_a, sqrt_1ma, seed=5, offset=9, backend="triton", return_noise=True
    )
    assert model_input.dtype == target.dtype == eps.dtype == dtype
    # The stream does not depend on the dtype: the fp32 run draws the same noise, unrounded.
    eps32 = _eps(shape, seed=5, offset=9)
    assert torch.equal(eps, eps32.to(dtype))

    exact_input, exact_target = (
        t.float() for t in inject_noise_ref(x0.float(), img.float(), sqrt_a, sqrt_1ma, eps32, "v")
    )
    # What a stock trainer computes in the 16-bit dtype itself, as the yardstick for error.
    a, s = sqrt_a.to(dtype).view(-1, 1, 1, 1, 1), sqrt_1ma.to(dtype).view(-1, 1, 1, 1, 1)
    stock_xt, stock_target = a * x0 + s * eps32.to(dtype), a * eps32.to(dtype) - s * x0
    c = shape[2]
    for ours, exact, stock in (
        (model_input[:, :, :c], exact_input[:, :, :c], stock_xt),
        (target, exact_target, stock_target),
    ):
        err = (ours.float() - exact).abs().max()
        assert err <= 2 * (stock.float() - exact).abs().max() + 1e-6
        # One rounding of the fp32 result: at most half a spacing, which is below ULP * |value|.
        assert ((ours.float() - exact).abs() <= ULP[dtype] * exact.abs() + 1e-7).all()
    assert torch.equal(model_input[:, :1, c:], img.to(dtype))


def test_block_size_does_not_change_the_stream():
    shape = (2, 2, 3, 11, 13)  # 429 elements per frame: 7 blocks of 64 against 1 of 512
    x0, img, sqrt_a, sqrt_1ma = _inputs(shape)
    key = (x0, img, sqrt_a, sqrt_1ma, 4, 1, "v", True)
    small = noise_mod._launch_inject(*key, block=64)
    default = noise_mod._launch_inject(*key)
    for s, d in zip(small, default):
        assert torch.equal(s, d)


def test_auto_is_torch_on_cpu():
    x0, img, sqrt_a, sqrt_1ma = _inputs((1, 2, 3, 4, 5))
    auto = inject_noise(x0, img, sqrt_a, sqrt_1ma, seed=1, backend="auto", return_noise=True)
    ref = inject_noise(x0, img, sqrt_a, sqrt_1ma, seed=1, backend="torch", return_noise=True)
    for a, r in zip(auto, ref):
        assert torch.equal(a, r)
    assert torch.equal(ref[2], noise_mod.torch_noise(x0, 1, 0))


# --------------------------------------------------------------------------- the noise itself


def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (Salmon et al. 2011) in numpy, checked below against Random123's known answers."""
    mask = np.uint64(0xFFFFFFFF)
    c = [np.asarray(x, dtype=np.uint64) & mask for x in (c0, c1, c2, c3)]
    k0, k1 = np.uint64(k0), np.uint64(k1)
    for _ in range(10):
        p0, p1 = np.uint64(0xD2511F53) * c[0], np.uint64(0xCD9E8D57) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & mask]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
    return c


def test_numpy_philox_known_answers():
    assert [int(x) for x in _philox4x32_10(0, 0, 0, 0, 0, 0)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    pi = _philox4x32_10(0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0)
    assert [int(x) for x in pi] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_stream_is_the_documented_one():
    # eps[r, j] = normal j % 4 of Philox(key=seed, counter=(j // 4, 2 r, offset lo, offset hi)).
    seed, offset = 0x1234_5678_9ABC, 3 * 2**32 + 17
    shape = (2, 3, 2, 5, 7)
    eps = _eps(shape, seed, offset).reshape(6, -1).numpy()
    n = eps.shape[1]
    rows, j = np.meshgrid(np.arange(6), np.arange(n), indexing="ij")
    words = _philox4x32_10(j // 4, 2 * rows, offset & 0xFFFFFFFF, offset >> 32, seed & 0xFFFFFFFF, seed >> 32)
    u = [((w >> np.uint64(8)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-24) for w in words]
    two_pi = np.float32(2 * np.pi)
    rad01, rad23 = np.sqrt(np.float32(-2) * np.log(u[0])), np.sqrt(np.float32(-2) * np.log(u[2]))
    normals = [
        rad01 * np.cos(two_pi * u[1]),
        rad01 * np.sin(two_pi * u[1]),
        rad23 * np.cos(two_pi * u[3]),
        rad23 * np.sin(two_pi * u[3]),
    ]
    expected = np.choose(j % 4, normals)
    np.testing.assert_allclose(eps, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def big_eps():
    """Noise of [2, 4, 4, 64, 50] = 102,400 values at offsets 0 and 1, seed 7."""
    shape = (2, 4, 4, 64, 50)
    return _eps(shape, seed=7, offset=0).numpy(), _eps(shape, seed=7, offset=1).numpy()


def test_noise_statistics(big_eps):
    z = big_eps[0].ravel().astype(np.float64)
    n = z.size
    assert n >= 100_000
    assert abs(z.mean()) < 5 / np.sqrt(n)
    assert abs(z.std() - 1) < 5 / np.sqrt(2 * n)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    # Tails as a normal has them: P(|z| > 2) = 4.55 %, P(|z| > 3) = 0.27 %.
    assert abs((np.abs(z) > 2).mean() - 0.0455) < 0.004
    assert abs((np.abs(z) > 3).mean() - 0.0027) < 0.001


def test_noise_uncorrelated_across_positions_rows_and_offsets(big_eps):
    eps0, eps1 = big_eps
    flat = eps0.ravel()
    bound = 5 / np.sqrt(flat.size)
    # Lags 1..8 cover the four words of one Philox call and its neighbour; 2048 is one block.
    for lag in (1, 2, 3, 4, 5, 8, 2048):
        assert abs(_corr(flat[:-lag], flat[lag:])) < bound, f"lag {lag}"
        # Box-Muller pairs share a radius: their squares must still be independent.
        assert abs(_corr(flat[:-lag] ** 2, flat[lag:] ** 2)) < bound, f"squares at lag {lag}"
    frames = eps0.reshape(8, -1)  # rows b * F + f
    assert abs(_corr(frames[:-1], frames[1:])) < bound  # consecutive frames and across samples
    assert abs(_corr(eps0[0], eps0[1])) < bound  # sample 0 against sample 1
    assert abs(_corr(eps0, eps1)) < bound  # consecutive offsets, same positions


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_reproducible_per_key_and_independent_across_keys(backend):
    shape = (2, 2, 4, 8, 8)
    base = _eps(shape, seed=3, offset=5, backend=backend)
    assert torch.equal(base, _eps(shape, seed=3, offset=5, backend=backend))
    bound = 5 / np.sqrt(base.numel())
    for other in ((3, 6), (4, 5), (3, 5 + 2**32), (3 + 2**32, 5)):  # high halves of offset and seed count too
        eps = _eps(shape, *other, backend=backend)
        assert abs(_corr(base, eps)) < bound, f"(seed, offset) = {other}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_seed_and_offset_wrap_mod_2_64(backend):
    # Negative seeds are legal (torch.manual_seed takes them); both backends read keys mod 2**64.
    shape = (1, 1, 2, 3, 4)
    assert torch.equal(_eps(shape, -1, -2, backend), _eps(shape, 2**64 - 1, 2**64 - 2, backend))
    assert not torch.equal(_eps(shape, -1, 0, backend), _eps(shape, 1, 0, backend))


def test_sample_noise_does_not_depend_on_batch_size():
    # Row r = b * F + f keys the stream, so sample 0 draws the same noise in a batch of 1 or 3.
    alone = _eps((1, 2, 3, 4, 5), seed=9)
    batched = _eps((3, 2, 3, 4, 5), seed=9)
    assert torch.equal(alone[0], batched[0])


# --------------------------------------------------------------------------- condition noise


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_condition_noise_sigma_zero_is_frames(backend, dtype):
    frames = _frames(dtype=dtype)
    out = condition_noise(frames, torch.zeros(2), seed=3, backend=backend)
    assert out.dtype == dtype and torch.equal(out, frames)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_condition_noise_keeps_the_image(backend):
    # The regression this project exists for: the encoder must see frames + sigma * eps, not sigma * eps.
    frames = _frames()
    sigma = torch.tensor([0.05, 0.2])
    out, eps = condition_noise(frames, sigma, seed=3, backend=backend, return_noise=True)
    for i in range(2):
        corr = _corr(out[i], frames[i])
        assert corr > 0.9, f"sample {i}: output barely correlates with the frames ({corr:.3f})"
        resid_std = ((out[i] - frames[i]) / sigma[i]).std()
        assert abs(resid_std - 1) < 0.1, f"sample {i}: (out - frames) / sigma has std {resid_std:.3f}"
    torch.testing.assert_close(out, condition_noise_ref(frames, sigma, eps), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_condition_noise_16bit_rounds_once(dtype):
    frames, sigma = _frames(b=3, h=7, w=9), torch.tensor([0.05, 0.1, 1.0])
    _, eps32 = condition_noise(frames, sigma, seed=2, offset=1, backend="triton", return_noise=True)
    out = condition_noise(frames.to(dtype), sigma, seed=2, offset=1, backend="triton")
    exact = condition_noise_ref(frames.to(dtype).float(), sigma, eps32)
    assert out.dtype == dtype
    assert ((out.float() - exact).abs() <= ULP[dtype] * exact.abs() + 1e-7).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_condition_noise_reproducible_and_separate_from_latent_noise(backend):
    frames = torch.zeros(1, 4, 2, 16)  # a 4-channel "frame" so the latent stream can be laid over it
    ones = torch.ones(1)
    out = condition_noise(frames, ones, seed=6, offset=2, backend=backend)
    assert torch.equal(out, condition_noise(frames, ones, seed=6, offset=2, backend=backend))
    latent = _eps((1, 1, 4, 2, 16), seed=6, offset=2, backend=backend)
    assert abs(_corr(out, latent)) < 0.5  # same key, different stream: unrelated draws
    assert not torch.equal(out.flatten(), latent.flatten())


# --------------------------------------------------------------------------- GPU compilation

# The interpreter accepts programs a GPU compiler refuses, so compile the real kernels for an H100/H200
# (sm_90) ahead of time: this needs triton's bundled ptxas, not a GPU. Runs in a child process
# because TRITON_INTERPRET, set for this one, decides at import how the kernels are defined.
_COMPILE_FOR_SM90 = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from i2v.kernels import noise

    target = GPUTarget("cuda", 90, 32)
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(7)}  # pointers, as a real launch sees them
    for ty in ("bf16", "fp16", "fp32"):
        for predict_v, store_eps in ((True, True), (False, False)):
            sig = {name: f"*{ty}" for name in ("x0_ptr", "img_ptr", "input_ptr", "target_ptr", "eps_ptr")}
            sig.update(sqrt_a_ptr="*fp32", sqrt_1ma_ptr="*fp32", seed="i64", off_lo="i32", off_hi="i32")
            sig.update(frames="i32", n="i32", blocks_per_row="i32")
            const = dict(PREDICT_V=predict_v, STORE_EPS=store_eps, SOFT_BF16=False, BLOCK=2048)
            sig.update({name: "constexpr" for name in const})
            kernel = triton.compile(ASTSource(noise._inject_kernel, sig, const, aligned), target=target)
            assert kernel.asm["cubin"], ty
        sig = dict(frames_ptr=f"*{ty}", sigma_ptr="*fp32", out_ptr=f"*{ty}", eps_ptr=f"*{ty}", seed="i64")
        sig.update(off_lo="i32", off_hi="i32", n="i32", blocks_per_row="i32")
        const = dict(STORE_EPS=True, SOFT_BF16=False, BLOCK=2048)
        sig.update({name: "constexpr" for name in const})
        kernel = triton.compile(ASTSource(noise._condition_kernel, sig, const, aligned), target=target)
        assert kernel.asm["cubin"], ty
    print("compiled")
    """
)


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


# --------------------------------------------------------------------------- bad input


def _bad_inject_cases():
    x0, img, a, s = _inputs((2, 3, 4, 5, 6))
    return [
        ("x0 must be", dict(x0=x0[0])),
        ("one latent frame", dict(image_latents=img.expand(2, 2, 4, 5, 6))),
        ("image_latents shape", dict(image_latents=img[:, :, :3])),
        ("image_latents shape", dict(image_latents=img[:1])),
        ("sqrt_alpha must", dict(sqrt_alpha=a[:1])),
        ("sqrt_one_minus_alpha must", dict(sqrt_one_minus_alpha=s.view(2, 1))),
        ("prediction", dict(prediction="x0")),
        ("backend", dict(backend="cuda")),
        ("seed and offset must be ints", dict(seed=1.5)),
        ("seed and offset must be ints", dict(offset="3")),
    ]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("message,change", _bad_inject_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_inject_noise_bad_input(backend, message, change):
    x0, img, a, s = _inputs((2, 3, 4, 5, 6))
    kwargs = dict(x0=x0, image_latents=img, sqrt_alpha=a, sqrt_one_minus_alpha=s, seed=0, backend=backend)
    kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        inject_noise(**kwargs)


def test_triton_rejects_float64():
    x0, img, a, s = _inputs((1, 1, 2, 3, 4), torch.float64)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        inject_noise(x0, img, a, s, seed=0, backend="triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_condition_noise_bad_input(backend):
    with pytest.raises(ValueError, match="sigma must"):
        condition_noise(_frames(), torch.zeros(3), seed=0, backend=backend)
    with pytest.raises(ValueError, match="frames must"):
        condition_noise(torch.zeros(5), torch.zeros(5), seed=0, backend=backend)
