"""Fused per-head LayerNorm + 3D RoPE of Q or K (forward and backward), for the DiT's attention processor.

    y = (x - mean) * rstd * weight + bias              LayerNorm over the head dim D, per (token, head)
    out[2i]   = y[2i]   * cos[s, 2i]   - y[2i+1] * sin[s, 2i]        on the video tokens s >= text_len
    out[2i+1] = y[2i+1] * cos[s, 2i+1] + y[2i]   * sin[s, 2i+1]      (out = y on the text tokens)

This is what diffusers' CogVideoXAttnProcessor2_0 does with `attn.norm_q` / `attn.norm_k`
(nn.LayerNorm(D, eps, elementwise_affine=True)) followed by `apply_rotary_emb` with real cos/sin
[S_video, D] and `use_real_unbind_dim=-1` (channels paired as (even, odd), the pair rotated as a complex
number), applied to the video tokens after the text tokens. Eager PyTorch spends about ten passes
over Q and K on it (norm, casts, the rotated copy, stack, products, sum, the write back into Q/K, and
as many again in the backward); here it is one read of x and one write of the output forward, and a
read of x and the upstream gradient and one write of dx backward.

Forward: each program takes BLOCK_R rows (a row = one (token, head) pair of D channels), reads x
[B, H, S, D] through its strides (a [B, S, H, D] projection viewed as [B, H, S, D] needs no copy),
computes mean and rstd in fp32 registers, normalises and applies weight and bias, then rotates: each
channel's partner (d xor 1) is read a second time from x (a cache hit, not HBM traffic) and normalised
the same way, so no in-register shuffle is needed. cos/sin are read per token ([S_video, D], never
broadcast over heads in memory) and masked to (1, 0) on the text rows, which leaves them as they are.
The output is written in x's dtype as a new [B, S, H, D] tensor returned as its [B, H, S, D] view,
the layout `i2v.kernels.attention.flash_attention` reads (and the processor's reshape back is free).
Saved for the backward: mean and rstd per row, fp32 ([B*S*H], 8 bytes per row).

Backward: with g the upstream gradient, dy[d] = g[d] cos[d] - sgn[d] g[d^1] sin[d^1] (sgn = -1 on
even channels, +1 on odd ones: the transpose of the rotation), then the LayerNorm backward
dx = rstd * (dy*w - mean(dy*w) - xhat * mean(dy*w * xhat)). dWeight = sum(dy * xhat) and
dBias = sum(dy) over all rows: each program loops over a contiguous range of rows and writes its
partial sums to a [programs, D] fp32 buffer, which one torch sum reduces (no atomics, deterministic).

Ops: `i2v::qk_norm_rope_fwd(x, weight, bias, float eps, cos, sin, int text_len) -> (out, mean, rstd)` and
`i2v::qk_norm_rope_bwd(grad, x, weight, mean, rstd, cos, sin, int text_len) -> (dx, dweight, dbias)`, with
fake implementations (the meta device runs those) and the forward's autograd formula; `qk_norm_rope` is
the public entry and `qk_norm_rope_ref` the plain-PyTorch reference with diffusers' maths.

dtypes: x fp32, bf16 or fp16; weight/bias any float dtype (fp32 master weights under autocast with bf16
activations is the training case); cos/sin any float dtype, used in fp32. All arithmetic is fp32; the
output is rounded once to x's dtype (eager rounds twice in 16-bit: after the norm, then after the
rotation). D: a power of two from 16 to 256 (CogVideoX 2B and 5B: 64).

The interpreter converts fp32 to bf16 by truncation, where a GPU rounds to nearest even; under the
interpreter the kernels add the rounding bias to the bits first, so the CPU tests see the GPU's rounding.

Tested on the CPU under TRITON_INTERPRET=1 (tests/test_qk_norm_rope.py): fp32 outputs and
gradients against diffusers' maths, bf16 error against an fp32 reference, opcheck, the fakes, and the
processor against diffusers' processor. Not yet compiled or timed on a GPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_PROGRAMS = 1024  # backward: enough to fill an H100/H200 several times; partial sums stay small


def supported_head_dim(d: int) -> bool:
    return 16 <= d <= 256 and d & (d - 1) == 0


def kernel_runs_on(x: torch.Tensor) -> bool:
    """CUDA tensors, the meta device (the fakes), or any tensor under the CPU interpreter."""
    return x.is_cuda or x.is_meta or _INTERPRET


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _round_to(v, DTYPE: tl.constexpr, RNE_BF16: tl.constexpr):
    """v (fp32) in DTYPE. The interpreter truncates fp32 -> bf16 where a GPU rounds to nearest even: with
    RNE_BF16 the rounding bias is added to the bits first, so the truncation gives the GPU's result."""
    if RNE_BF16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        v = bits.to(tl.float32, bitcast=True)
    return v.to(DTYPE)


@triton.jit
def _row_addresses(rows, H, S, stride_b, stride_h, stride_s):
    """Rows are (b, s, h) in [B, S, H] order: each row's element offset in a strided tensor, and its token s."""
    h = rows % H
    s = (rows // H) % S
    b = rows // (H * S)
    base = b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h + s.to(tl.int64) * stride_s
    return base, s


@triton.jit
def _qk_norm_rope_fwd(X, W, Bias, COS, SIN, OUT, MEAN, RSTD,
                      stride_xb, stride_xh, stride_xs, stride_xd,
                      n_rows, H, S, text_len, eps,
                      HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, RNE_BF16: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, HEAD_DIM)
    partner = offs_d ^ 1
    row_ok = rows < n_rows
    base, s = _row_addresses(rows, H, S, stride_xb, stride_xh, stride_xs)
    m2 = row_ok[:, None]

    x = tl.load(X + base[:, None] + offs_d[None, :] * stride_xd, mask=m2, other=0.0).to(tl.float32)
    mean = tl.sum(x, 1) / HEAD_DIM
    xc = x - mean[:, None]
    var = tl.sum(xc * xc, 1) / HEAD_DIM
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + offs_d).to(tl.float32)
    bias = tl.load(Bias + offs_d).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + bias[None, :]

    # The partner channel (d xor 1), normalised the same way: the second read of x hits the cache.
    xp = tl.load(X + base[:, None] + partner[None, :] * stride_xd, mask=m2, other=0.0).to(tl.float32)
    wp = tl.load(W + partner).to(tl.float32)
    bp = tl.load(Bias + partner).to(tl.float32)
    yp = (xp - mean[:, None]) * rstd[:, None] * wp[None, :] + bp[None, :]

    # Text rows read cos = 1, sin = 0: the rotation leaves them as they are.
    video = row_ok & (s >= text_len)
    t = (s - text_len).to(tl.int64)
    cs_off = t[:, None] * HEAD_DIM + offs_d[None, :]
    cos = tl.load(COS + cs_off, mask=video[:, None], other=1.0).to(tl.float32)
    sin = tl.load(SIN + cs_off, mask=video[:, None], other=0.0).to(tl.float32)
    sgn = tl.where((offs_d % 2) == 0, -1.0, 1.0)
    out = y * cos + sgn[None, :] * yp * sin

    tl.store(OUT + rows[:, None] * HEAD_DIM + offs_d[None, :], _round_to(out, OUT.dtype.element_ty, RNE_BF16),
             mask=m2)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _qk_norm_rope_bwd(G, X, W, COS, SIN, MEAN, RSTD, DX, DW_PART, DB_PART,
                      stride_gb, stride_gh, stride_gs, stride_gd,
                      stride_xb, stride_xh, stride_xs, stride_xd,
                      n_rows, H, S, text_len, rows_per_program,
                      HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, RNE_BF16: tl.constexpr):
    pid = tl.program_id(0)
    offs_d = tl.arange(0, HEAD_DIM)
    partner = offs_d ^ 1
    sgn = tl.where((offs_d % 2) == 0, -1.0, 1.0)
    w = tl.load(W + offs_d).to(tl.float32)
    dw = tl.zeros([HEAD_DIM], tl.float32)
    db = tl.zeros([HEAD_DIM], tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    for start in range(0, rows_per_program, BLOCK_R):
        rows = first + start + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        m2 = row_ok[:, None]
        gbase, s = _row_addresses(rows, H, S, stride_gb, stride_gh, stride_gs)
        xbase, _ = _row_addresses(rows, H, S, stride_xb, stride_xh, stride_xs)

        g = tl.load(G + gbase[:, None] + offs_d[None, :] * stride_gd, mask=m2, other=0.0).to(tl.float32)
        gp = tl.load(G + gbase[:, None] + partner[None, :] * stride_gd, mask=m2, other=0.0).to(tl.float32)
        video = row_ok & (s >= text_len)
        t = (s - text_len).to(tl.int64)
        cos = tl.load(COS + t[:, None] * HEAD_DIM + offs_d[None, :], mask=video[:, None], other=1.0)
        sinp = tl.load(SIN + t[:, None] * HEAD_DIM + partner[None, :], mask=video[:, None], other=0.0)
        # Transpose of the rotation: out[d^1] took sgn[d^1] * sin[d^1] * y[d], and sgn[d^1] = -sgn[d].
        dy = g * cos.to(tl.float32) - sgn[None, :] * gp * sinp.to(tl.float32)

        x = tl.load(X + xbase[:, None] + offs_d[None, :] * stride_xd, mask=m2, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = (x - mean[:, None]) * rstd[:, None]  # zero on rows past the end: they add nothing below
        dw += tl.sum(dy * xhat, 0)
        db += tl.sum(dy, 0)
        dxhat = dy * w[None, :]
        c1 = tl.sum(dxhat * xhat, 1) / HEAD_DIM
        c2 = tl.sum(dxhat, 1) / HEAD_DIM
        dx = (dxhat - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(DX + rows[:, None] * HEAD_DIM + offs_d[None, :], _round_to(dx, DX.dtype.element_ty, RNE_BF16),
                 mask=m2)
    tl.store(DW_PART + pid * HEAD_DIM + offs_d, dw)
    tl.store(DB_PART + pid * HEAD_DIM + offs_d, db)


# ----------------------------------------------------------------------------- host side


def _bshd_like(x: torch.Tensor) -> torch.Tensor:
    """An empty [B, H, S, D] tensor stored as [B, S, H, D] (contiguous), x's dtype and device."""
    b, h, s, d = x.shape
    return torch.empty((b, s, h, d), dtype=x.dtype, device=x.device).transpose(1, 2)


def _rne_bf16(dtype: torch.dtype) -> bool:
    return _INTERPRET and dtype == torch.bfloat16


def _block_rows(d: int) -> int:
    # The interpreter pays per op, so big tiles; on a GPU about 4K elements per tile keeps registers low.
    return 128 if _INTERPRET else max(1, 4096 // d)


def _fwd(x, weight, bias, eps, cos, sin, text_len):
    b, h, s, d = x.shape
    n_rows = b * s * h
    out = _bshd_like(x)
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return out, mean, rstd
    block = _block_rows(d)
    cos, sin = cos.contiguous(), sin.contiguous()
    _qk_norm_rope_fwd[(triton.cdiv(n_rows, block),)](
        x, weight.contiguous(), bias.contiguous(), cos, sin, out, mean, rstd,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        n_rows, h, s, text_len, eps,
        HEAD_DIM=d, BLOCK_R=block, RNE_BF16=_rne_bf16(x.dtype), num_warps=4)
    return out, mean, rstd


def _bwd(grad, x, weight, mean, rstd, cos, sin, text_len):
    b, h, s, d = x.shape
    n_rows = b * s * h
    dx = _bshd_like(x)
    if n_rows == 0:
        return dx, torch.zeros_like(weight), torch.zeros_like(weight)
    block = _block_rows(d)
    blocks = triton.cdiv(n_rows, block)
    programs = min(blocks, _MAX_PROGRAMS)
    rows_per_program = triton.cdiv(blocks, programs) * block
    programs = triton.cdiv(n_rows, rows_per_program)
    dw_part = torch.empty((programs, d), dtype=torch.float32, device=x.device)
    db_part = torch.empty((programs, d), dtype=torch.float32, device=x.device)
    cos, sin = cos.contiguous(), sin.contiguous()
    _qk_norm_rope_bwd[(programs,)](
        grad, x, weight.contiguous(), cos, sin, mean, rstd, dx, dw_part, db_part,
        grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3),
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        n_rows, h, s, text_len, rows_per_program,
        HEAD_DIM=d, BLOCK_R=block, RNE_BF16=_rne_bf16(x.dtype), num_warps=4)
    return dx, dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(weight.dtype)


@torch.library.custom_op("i2v::qk_norm_rope_fwd", mutates_args=())
def qk_norm_rope_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, cos: torch.Tensor,
                     sin: torch.Tensor, text_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, mean, rstd): out [B, H, S, D] in x's dtype, a view of [B, S, H, D] storage; mean, rstd [B*S*H] fp32."""
    return _fwd(x, weight, bias, eps, cos, sin, text_len)


@qk_norm_rope_fwd.register_fake
def _qk_norm_rope_fwd_fake(x, weight, bias, eps, cos, sin, text_len):
    b, h, s, _ = x.shape
    rows = b * s * h
    return _bshd_like(x), x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("i2v::qk_norm_rope_bwd", mutates_args=())
def qk_norm_rope_bwd(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                     rstd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, text_len: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias): dx [B, H, S, D] in x's dtype ([B, S, H, D] storage), dweight/dbias like weight."""
    return _bwd(grad, x, weight, mean, rstd, cos, sin, text_len)


@qk_norm_rope_bwd.register_fake
def _qk_norm_rope_bwd_fake(grad, x, weight, mean, rstd, cos, sin, text_len):
    return _bshd_like(x), torch.empty_like(weight), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, cos, sin, text_len = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd, cos, sin)
    ctx.text_len = text_len
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, grad, _dmean, _drstd):
    x, weight, mean, rstd, cos, sin = ctx.saved_tensors
    dx, dw, db = qk_norm_rope_bwd(grad, x, weight, mean, rstd, cos, sin, ctx.text_len)
    return (dx if ctx.needs_input_grad[0] else None, dw if ctx.needs_input_grad[1] else None,
            db if ctx.needs_input_grad[2] else None, None, None, None, None)


qk_norm_rope_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check(x, weight, bias, cos, sin, text_len):
    if x.dim() != 4:
        raise ValueError(f"qk_norm_rope: x must be [B, H, S, D], got shape {tuple(x.shape)}")
    b, h, s, d = x.shape
    if x.dtype not in _DTYPES:
        raise ValueError(f"qk_norm_rope: x must be fp16/bf16/fp32, got {x.dtype}")
    if not supported_head_dim(d):
        raise ValueError(f"qk_norm_rope: head dim must be a power of two in [16, 256], got {d}")
    if weight.shape != (d,) or bias.shape != (d,):
        raise ValueError(f"qk_norm_rope: weight and bias must be [{d}], got {tuple(weight.shape)}, {tuple(bias.shape)}")
    if not 0 <= text_len <= s or cos.shape != (s - text_len, d) or sin.shape != cos.shape:
        raise ValueError(f"qk_norm_rope: cos/sin must be [S - text_len, D] = [{s - text_len}, {d}] "
                         f"(text_len {text_len}), got {tuple(cos.shape)}, {tuple(sin.shape)}")
    devices = {t.device for t in (x, weight, bias, cos, sin)}
    if len(devices) != 1:
        raise ValueError(f"qk_norm_rope: inputs on different devices: {sorted(map(str, devices))}")
    if not kernel_runs_on(x):
        raise ValueError("qk_norm_rope: needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)")


def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, cos: torch.Tensor,
                 sin: torch.Tensor, text_len: int) -> torch.Tensor:
    """LayerNorm(D) of x [B, H, S, D] (any strides), then RoPE on the tokens s >= text_len; differentiable.

    cos, sin: [S - text_len, D]. Returns x's dtype, a [B, H, S, D] view of new [B, S, H, D] storage.
    """
    _check(x, weight, bias, cos, sin, text_len)
    return qk_norm_rope_fwd(x, weight, bias, float(eps), cos, sin, int(text_len))[0]


def qk_norm_rope_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, cos: torch.Tensor,
                     sin: torch.Tensor, text_len: int) -> torch.Tensor:
    """Plain PyTorch, diffusers' maths: F.layer_norm, then `apply_rotary_emb` on the video tokens (fp32 inside)."""
    y = torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    video = y[:, :, text_len:]
    pairs = video.reshape(*video.shape[:-1], -1, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(3)
    video = (video.float() * cos[None, None].float() + rotated.float() * sin[None, None].float()).to(y.dtype)
    return torch.cat([y[:, :, :text_len], video], dim=2)
