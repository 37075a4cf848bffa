"""Noise injection for the I2V training step: one fused pass instead of about a dozen launches.

Given x0 [B, F, C, h, w], image latents [B, 1, C, h, w] and per-sample sqrt(alpha_bar),
sqrt(1 - alpha_bar) [B], produce

    model_input = cat([sqrt_a * x0 + sqrt_1ma * eps, image latents zero-padded over F], dim=2)
    target      = sqrt_a * eps - sqrt_1ma * x0        (prediction="v")   or eps   (prediction="epsilon")

with eps drawn from a counter-based stream keyed by (seed, offset), so every rank, micro-batch
and step gets an independent stream and the same key reproduces it. The precompute job's
pixel-space condition noise, `frames + sigma * eps`, lives here too (`condition_noise`).

Backends
    "torch"   plain PyTorch; noise from a torch.Generator seeded from (seed, offset).
    "triton"  the fused kernels below (on a CPU tensor they need TRITON_INTERPRET=1 set before
              this module is imported).
    "auto"    Triton when the tensor is on CUDA and triton imports, else torch.
The two backends draw different, equally valid noise; within one backend and device type the
same (seed, offset) and shape reproduce it bit for bit.

Noise stream of the Triton backend (fixed here, independent of block size, grid and dtype)
    For row r (inject_noise: r = b * F + f; condition_noise: r = b) and flat index j inside the
    row, eps[r, j] is normal number j % 4 of one Philox4x32-10 call with key = seed (64 bit) and
    counter = (j // 4, 2 r + stream, offset mod 2**32, offset // 2**32), stream 0 for the latent
    noise and 1 for the condition noise. Each call's four 32-bit words become four normals by
    Box-Muller on the top 24 bits (uniforms in (0, 1), so |eps| <= 5.9). Distinct offsets or rows
    are distinct Philox counters, hence independent streams; the integers are exact on every
    device, the floats agree across devices to the accuracy of their log/sin/cos (~1e-6).

Ops: `i2v::inject_noise(x0, image_latents, sqrt_alpha, sqrt_one_minus_alpha, int seed, int offset,
bool predict_v, bool return_noise) -> (model_input, target, eps)` and `i2v::condition_noise(frames, sigma,
int seed, int offset, bool return_noise) -> (out, eps)` (eps is an empty [0] tensor unless asked for; seed and
offset as signed 64-bit images of the unsigned key), each with a fake implementation for the meta device and
FakeTensor tracing. `inject_noise` and `condition_noise` are the public entries.

No autograd.Function and no autograd formula: nothing upstream of noise injection is trained (x0 and the image
latents come from the frozen VAE), so the outputs carry no graph.

Tested on CPU under the interpreter: B in {1, 2, 3}, F in {1, 2, 3, 4}, C in {2, 3, 4, 16}, h*w
from 20 to 3200 (35, 63, 143: not a multiple of any block); x0 and image latents in fp32, fp16,
bf16 (16-bit x0 with fp32 image latents too); fp32 outputs match the reference on the kernel's
own noise within 1e-6, 16-bit ones within one rounding of the exact value; noise statistics over
102,400 values. Both kernels compile for sm_90 ahead of time (a test, triton's own ptxas).
inject_noise has run on one NVIDIA H200 (torch 2.11, triton 3.6;
bench/results/noise-nvidia-h200.json): at [B, 13, 16, 60, 90] in bf16 it matches the reference,
its noise statistics over 1,123,200 values hold, and it runs 2.55x eager PyTorch at B=1
(`python bench/noise.py`). condition_noise has only been timed there (2.8x eager on 8 frames of
480x720), not checked.
Limits: non-contiguous inputs are copied; C*h*w < 2**31 - 2048 (the in-row index is int32);
B*F*ceil(C*h*w / BLOCK) < 2**31 programs (one grid axis); seed and offset are ints, taken mod 2**64.
Under the interpreter bf16 stores round in integer arithmetic, as its own fp32 -> bf16 cast
truncates; on a GPU they use the hardware round-to-nearest-even conversion.

Why condition_noise shares the kernel family although it does not pay for itself:
a [B, 3, 480, 720] fp32 frame batch is 4.1 MB per sample. Eager torch (randn, sigma * eps,
frames + that) moves about 24 bytes per element, the fused kernel 8 (read frames, write the
result), so fusion saves ~17 MB and three launches per sample, a few microseconds on an H200,
next to a VAE encode of the same frame that takes milliseconds (an estimate; bench/noise.py times
the noise side). It is kept because it costs one
short kernel on the same noise helper, gives `backend="triton"` the same meaning for both ops,
and draws from the same documented Philox stream.
"""

from __future__ import annotations

import contextlib
import operator
import os

import torch

from i2v.core import diffusion, seeding
from i2v.kernels.backends import resolve_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is an optional extra; the torch backend needs none of it
    triton = None

# Read once: the kernels below are defined as interpreted or compiled at import time.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Separates the pixel-space condition noise from the latent noise drawn with the same (seed, offset).
_CONDITION_STREAM = 1

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_BLOCK = 2048
_MASK64 = 2**64 - 1


# --------------------------------------------------------------------------- torch reference


def torch_noise(like: torch.Tensor, seed: int, offset: int, stream: int = 0) -> torch.Tensor:
    """Standard normal noise shaped like `like`, reproducible per (seed, offset), fp32."""
    gen = seeding.generator("noise", seed, offset, stream, device=like.device)
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


def condition_noise_ref(frames, sigma, noise):
    """Plain-PyTorch reference with the noise given: frames + sigma * noise in frames' dtype."""
    sig = sigma.to(frames.device, torch.float32).view(-1, *([1] * (frames.dim() - 1)))
    return (frames.float() + sig * noise.float()).to(frames.dtype)


# --------------------------------------------------------------------------- Triton kernels

if triton is not None:

    @triton.jit
    def _uniform(bits):
        # Top 24 bits, centred in their bucket: strictly inside (0, 1), so log() never sees 0.
        return ((bits >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08

    @triton.jit
    def _narrow(x, out_ty: tl.constexpr, SOFT_BF16: tl.constexpr):
        """fp32 -> output dtype, rounding to nearest even."""
        if SOFT_BF16:
            # The interpreter's own fp32 -> bf16 cast truncates; round in integer arithmetic instead.
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(out_ty)

    @triton.jit
    def _row_normals(seed, row_tag, off_lo, off_hi, blk, BLOCK: tl.constexpr):
        """eps for in-row indices blk * BLOCK + arange(BLOCK): four normals per Philox call."""
        QUARTER: tl.constexpr = BLOCK // 4
        group = (blk * QUARTER + tl.arange(0, QUARTER)).to(tl.uint32)
        zero = group * 0  # counters must be blocks, not scalars, all the way through the rounds
        r0, r1, r2, r3 = tl.philox(
            seed, group, zero + row_tag.to(tl.uint32), zero + off_lo.to(tl.uint32), zero + off_hi.to(tl.uint32)
        )
        u0, u1, u2, u3 = _uniform(r0), _uniform(r1), _uniform(r2), _uniform(r3)
        rad01 = tl.sqrt(-2.0 * tl.log(u0))
        rad23 = tl.sqrt(-2.0 * tl.log(u2))
        n0 = rad01 * tl.cos(6.283185307179586 * u1)
        n1 = rad01 * tl.sin(6.283185307179586 * u1)
        n2 = rad23 * tl.cos(6.283185307179586 * u3)
        n3 = rad23 * tl.sin(6.283185307179586 * u3)
        # [n0[0], n1[0], n2[0], n3[0], n0[1], ...]: element j takes word j % 4 of call j // 4.
        return tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3))

    @triton.jit(do_not_specialize=["seed", "off_lo", "off_hi"])
    def _inject_kernel(
        x0_ptr,
        img_ptr,
        sqrt_a_ptr,
        sqrt_1ma_ptr,
        input_ptr,
        target_ptr,
        eps_ptr,
        seed,
        off_lo,
        off_hi,
        frames,
        n,  # elements per (b, f) frame: C * h * w
        blocks_per_row,
        PREDICT_V: tl.constexpr,
        STORE_EPS: tl.constexpr,
        SOFT_BF16: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # A 1-D grid over (row, block) keeps clear of the 65535 limit of grid axes 1 and 2.
        pid = tl.program_id(0)
        row = pid // blocks_per_row  # b * F + f
        blk = pid % blocks_per_row
        b = row // frames
        f = row % frames

        j = blk * BLOCK + tl.arange(0, BLOCK)
        mask = j < n
        eps = _row_normals(seed, 2 * row, off_lo, off_hi, blk, BLOCK)

        row64 = row.to(tl.int64)
        # Load in any float dtype, compute in fp32: the interpreter's bf16 arithmetic is wrong
        # and fp32 is what the reference does.
        x = tl.load(x0_ptr + row64 * n + j, mask=mask, other=0.0).to(tl.float32)
        sqrt_a = tl.load(sqrt_a_ptr + b)
        sqrt_1ma = tl.load(sqrt_1ma_ptr + b)
        x_t = sqrt_a * x + sqrt_1ma * eps
        if PREDICT_V:
            target = sqrt_a * eps - sqrt_1ma * x
        else:
            target = eps

        out_ty = input_ptr.dtype.element_ty
        in_row = input_ptr + row64 * (2 * n)
        tl.store(in_row + j, _narrow(x_t, out_ty, SOFT_BF16), mask=mask)
        # Channel half 2: the image latent in frame 0, zeros elsewhere; frames f > 0 read nothing.
        img = tl.load(img_ptr + b.to(tl.int64) * n + j, mask=mask & (f == 0), other=0.0)
        tl.store(in_row + n + j, _narrow(img.to(tl.float32), out_ty, SOFT_BF16), mask=mask)
        tl.store(target_ptr + row64 * n + j, _narrow(target, out_ty, SOFT_BF16), mask=mask)
        if STORE_EPS:
            tl.store(eps_ptr + row64 * n + j, _narrow(eps, out_ty, SOFT_BF16), mask=mask)

    @triton.jit(do_not_specialize=["seed", "off_lo", "off_hi"])
    def _condition_kernel(
        frames_ptr,
        sigma_ptr,
        out_ptr,
        eps_ptr,
        seed,
        off_lo,
        off_hi,
        n,  # elements per sample
        blocks_per_row,
        STORE_EPS: tl.constexpr,
        SOFT_BF16: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        row = pid // blocks_per_row
        blk = pid % blocks_per_row
        j = blk * BLOCK + tl.arange(0, BLOCK)
        mask = j < n
        eps = _row_normals(seed, 2 * row + 1, off_lo, off_hi, blk, BLOCK)
        base = row.to(tl.int64) * n
        x = tl.load(frames_ptr + base + j, mask=mask, other=0.0).to(tl.float32)
        sigma = tl.load(sigma_ptr + row)
        out_ty = out_ptr.dtype.element_ty
        tl.store(out_ptr + base + j, _narrow(x + sigma * eps, out_ty, SOFT_BF16), mask=mask)
        if STORE_EPS:
            tl.store(eps_ptr + base + j, _narrow(eps, out_ty, SOFT_BF16), mask=mask)


def _block_for(n: int) -> int:
    """Elements per program: a power of two (a GPU needs one), at most _MAX_BLOCK, no bigger than the row needs."""
    return max(64, min(_MAX_BLOCK, triton.next_power_of_2(n)))


def _on_device(t: torch.Tensor):
    """Launch on the tensor's GPU: Triton uses the current device, which need not be the tensor's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _soft_bf16(out: torch.Tensor) -> bool:
    return _INTERPRET and out.dtype == torch.bfloat16


def _split_key(seed: int, offset: int) -> tuple[int, int, int]:
    return seed, offset & 0xFFFFFFFF, offset >> 32


def _launch_inject(
    x0, image_latents, sqrt_alpha, sqrt_one_minus_alpha, seed, offset, prediction, return_noise, block=None
):
    """Run _inject_kernel on validated inputs; `block` overrides the block size (the benchmark sweeps it)."""
    b, f, c, h, w = x0.shape
    n = c * h * w
    x0 = x0.contiguous()
    image_latents = image_latents.contiguous()
    sqrt_a = sqrt_alpha.to(x0.device, torch.float32).contiguous()
    sqrt_1ma = sqrt_one_minus_alpha.to(x0.device, torch.float32).contiguous()
    model_input = torch.empty((b, f, 2 * c, h, w), device=x0.device, dtype=x0.dtype)
    target = torch.empty_like(x0)
    eps = torch.empty_like(x0) if return_noise else target  # unused pointer when not stored
    if x0.numel():
        block = block or _block_for(n)
        blocks_per_row = triton.cdiv(n, block)
        seed, off_lo, off_hi = _split_key(seed, offset)
        with _on_device(x0):
            _inject_kernel[(b * f * blocks_per_row,)](
                x0, image_latents, sqrt_a, sqrt_1ma, model_input, target, eps,
                seed, off_lo, off_hi, f, n, blocks_per_row,
                PREDICT_V=prediction == "v", STORE_EPS=return_noise, SOFT_BF16=_soft_bf16(x0), BLOCK=block,
            )  # fmt: skip
    return model_input, target, (eps if return_noise else None)


def _launch_condition(frames, sigma, seed, offset, return_noise, block=None):
    frames = frames.contiguous()
    sigma = sigma.to(frames.device, torch.float32).contiguous()
    rows = frames.shape[0]
    n = frames[0].numel()
    out = torch.empty_like(frames)
    eps = torch.empty_like(frames) if return_noise else out
    if frames.numel():
        block = block or _block_for(n)
        blocks_per_row = triton.cdiv(n, block)
        seed, off_lo, off_hi = _split_key(seed, offset)
        with _on_device(frames):
            _condition_kernel[(rows * blocks_per_row,)](
                frames, sigma, out, eps, seed, off_lo, off_hi, n, blocks_per_row,
                STORE_EPS=return_noise, SOFT_BF16=_soft_bf16(frames), BLOCK=block,
            )  # fmt: skip
    return out, (eps if return_noise else None)


# --------------------------------------------------------------------------- custom ops
# The launchers as PyTorch custom ops, so the dispatcher (a dispatch mode, FakeTensor tracing, the meta
# device) sees one op with known output shapes instead of Python. No autograd: the outputs carry no
# graph (see the module docstring). Op arguments are int64, so the 64-bit seed and offset travel as their
# signed two's-complement images and are turned back into the same unsigned key inside.
# An output that is not asked for (eps without return_noise) is an empty [0] tensor.


def _signed64(x: int) -> int:
    return x - 2**64 if x >= 2**63 else x


def _unsigned64(x: int) -> int:
    return x & _MASK64


if triton is not None:

    @torch.library.custom_op("i2v::inject_noise", mutates_args=())
    def inject_noise_op(x0: torch.Tensor, image_latents: torch.Tensor, sqrt_alpha: torch.Tensor,
                        sqrt_one_minus_alpha: torch.Tensor, seed: int, offset: int, predict_v: bool,
                        return_noise: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(model_input [B, F, 2C, h, w], target [B, F, C, h, w], eps like x0 or empty [0]) in x0's dtype."""
        model_input, target, eps = _launch_inject(
            x0, image_latents, sqrt_alpha, sqrt_one_minus_alpha, _unsigned64(seed), _unsigned64(offset),
            "v" if predict_v else "epsilon", return_noise,
        )
        return model_input, target, (x0.new_empty(0) if eps is None else eps)

    @inject_noise_op.register_fake
    def _inject_noise_fake(x0, image_latents, sqrt_alpha, sqrt_one_minus_alpha, seed, offset, predict_v,
                           return_noise):
        b, f, c, h, w = x0.shape
        model_input = x0.new_empty((b, f, 2 * c, h, w))
        return model_input, torch.empty_like(x0), (torch.empty_like(x0) if return_noise else x0.new_empty(0))

    @torch.library.custom_op("i2v::condition_noise", mutates_args=())
    def condition_noise_op(frames: torch.Tensor, sigma: torch.Tensor, seed: int, offset: int,
                           return_noise: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(frames + sigma * eps, eps or empty [0]) in frames' dtype."""
        out, eps = _launch_condition(frames, sigma, _unsigned64(seed), _unsigned64(offset), return_noise)
        return out, (frames.new_empty(0) if eps is None else eps)

    @condition_noise_op.register_fake
    def _condition_noise_fake(frames, sigma, seed, offset, return_noise):
        return torch.empty_like(frames), (torch.empty_like(frames) if return_noise else frames.new_empty(0))


# --------------------------------------------------------------------------- public API


def _check_key(seed, offset):
    """Any ints, taken mod 2**64 (as torch.manual_seed takes seeds; the torch backend's key mixing agrees)."""
    try:
        seed, offset = operator.index(seed), operator.index(offset)
    except TypeError:
        types = f"{type(seed).__name__} and {type(offset).__name__}"
        raise ValueError(f"seed and offset must be ints, got {types}") from None
    return seed & _MASK64, offset & _MASK64


def _check_coef(name, coef, batch):
    if not isinstance(coef, torch.Tensor) or tuple(coef.shape) != (batch,):
        shape = tuple(coef.shape) if isinstance(coef, torch.Tensor) else type(coef).__name__
        raise ValueError(f"{name} must be a tensor of shape [B] = ({batch},), got {shape}")


def _resolve_backend(backend, tensor):
    backend = resolve_backend(backend, tensor.device)  # auto: the rule of i2v.kernels.backends
    if backend == "triton":
        if triton is None:
            raise ValueError("backend='triton' needs the triton package, which is not installed")
        if not (tensor.is_cuda or tensor.is_meta) and not _INTERPRET:
            raise ValueError(
                f"backend='triton' on a {tensor.device.type} tensor needs TRITON_INTERPRET=1 set before "
                "i2v.kernels.noise is imported"
            )
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"backend='triton' takes float32, float16 or bfloat16 tensors, got {tensor.dtype}")
    return backend


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
    """Noisy model input and training target in one call; see the module docstring.

    Returns (model_input [B, F, 2C, h, w], target [B, F, C, h, w]) in x0's dtype, plus eps in
    x0's dtype when `return_noise`.
    """
    if x0.dim() != 5:
        raise ValueError(f"x0 must be [B, F, C, h, w], got shape {tuple(x0.shape)}")
    bsz, _, c, h, w = x0.shape
    if image_latents.dim() != 5:
        raise ValueError(f"image_latents must be [B, 1, C, h, w], got shape {tuple(image_latents.shape)}")
    if image_latents.shape[1] != 1:
        raise ValueError(f"image_latents must have one latent frame (dim 1), got shape {tuple(image_latents.shape)}")
    if (image_latents.shape[0], *image_latents.shape[2:]) != (bsz, c, h, w):
        raise ValueError(
            f"image_latents shape {tuple(image_latents.shape)} does not match x0 {tuple(x0.shape)}: "
            f"expected ({bsz}, 1, {c}, {h}, {w})"
        )
    if image_latents.device != x0.device:
        raise ValueError(f"image_latents is on {image_latents.device} but x0 is on {x0.device}")
    _check_coef("sqrt_alpha", sqrt_alpha, bsz)
    _check_coef("sqrt_one_minus_alpha", sqrt_one_minus_alpha, bsz)
    if prediction not in ("v", "epsilon"):
        raise ValueError(f"prediction must be 'v' or 'epsilon', got {prediction!r}")
    seed, offset = _check_key(seed, offset)

    if _resolve_backend(backend, x0) == "triton":
        if image_latents.dtype not in _DTYPES:
            raise ValueError(f"image_latents must be float32, float16 or bfloat16, got {image_latents.dtype}")
        model_input, target, eps = inject_noise_op(
            x0, image_latents, sqrt_alpha, sqrt_one_minus_alpha, _signed64(seed), _signed64(offset),
            prediction == "v", return_noise,
        )
        return (model_input, target, eps) if return_noise else (model_input, target)

    noise = torch_noise(x0, seed, offset)
    model_input, target = inject_noise_ref(x0, image_latents, sqrt_alpha, sqrt_one_minus_alpha, noise, prediction)
    if return_noise:
        return model_input, target, noise.to(x0.dtype)
    return model_input, target


def condition_noise(frames, sigma, seed, offset=0, backend="auto", return_noise=False):
    """The noisy image condition `frames + sigma * eps` (never `sigma * eps` alone).

    frames [B, ...] in [-1, 1] (typically [B, 3, H, W]); sigma [B] fp32, one per sample.
    Returns a tensor in frames' dtype, and eps in frames' dtype too when `return_noise`.
    """
    if frames.dim() < 2:
        raise ValueError(f"frames must be [B, ...] with at least 2 dims, got shape {tuple(frames.shape)}")
    _check_coef("sigma", sigma, frames.shape[0])
    seed, offset = _check_key(seed, offset)

    if _resolve_backend(backend, frames) == "triton":
        out, eps = condition_noise_op(frames, sigma, _signed64(seed), _signed64(offset), return_noise)
        return (out, eps) if return_noise else out

    noise = torch_noise(frames, seed, offset, _CONDITION_STREAM)
    noisy = condition_noise_ref(frames, sigma, noise)
    if return_noise:
        return noisy, noise.to(frames.dtype)
    return noisy
