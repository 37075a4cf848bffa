"""The timestep modulation of a CogVideoX block, fused: adaptive LayerNorm and gated residual (forward, backward).

diffusers' CogVideoXBlock modulates both streams (video x [B, Sv, C], text e [B, St, C]) with per-sample
vectors [B, C] cut from `linear(silu(temb))`:

    adaptive_norm:   y = LN(x) * (1 + scale_x) + shift_x,   z = LN(e) * (1 + scale_e) + shift_e
                     (one nn.LayerNorm(C) with affine weight and bias for both streams), written as the
                     joint sequence out = [z, y] ([B, St + Sv, C], text first): what the attention
                     processor and the feed-forward take.
    gated_residual:  x' = x + gate_x * r[:, St:],   e' = e + gate_e * r[:, :St]
                     where r [B, St + Sv, C] is the attention's or the feed-forward's joint output.
    residual_norm:   gated_residual, then adaptive_norm of its result, in one kernel (the block's attention
                     residual followed by norm2): returns x', e' and the joint norm.

Eager PyTorch spends, per block and training step, about 40 launches and 9 passes over the activations on
these (layer norms, the (1 + scale), products, sums, slices, the cat, and the backward's reductions over
tokens). Here each op is one launch forward (each input read once, each output written once) and one
backward, plus a small kernel that sums the backward's [.., C] partial sums.

Forward: one program per BLOCK_R rows of the joint sequence of one sample; a row below St reads the text
stream, the others the video stream (both loads are masked, so each element is read once). All arithmetic
is fp32 in registers; results are rounded once to x's dtype (eager bf16 rounds after each op; residual_norm
normalises the rounded x', the value diffusers' norm2 reads). The norms save mean and rstd per row (fp32,
8 bytes per token) for the backward.

Backward: programs cover (P row ranges, 2 streams, B samples); each loops over its contiguous rows and
writes its partial sums over tokens (d shift and d scale, d gate, per stream and sample; d weight and
d bias) to fp32 buffers that a small kernel sums and casts: no atomics, deterministic.
    adaptive_norm:  with g the upstream gradient, xhat = (x - mean) * rstd, n = xhat * w + b:
                    d shift = sum g, d scale = sum g * n, dn = g * (1 + scale), d w = sum dn * xhat,
                    d b = sum dn, dx = rstd * (dn w - mean(dn w) - xhat * mean(dn w * xhat)).
    gated_residual: dx = g_x and de = g_e (passed through, no copy), dr = gate * g written as the joint
                    [B, St + Sv, C] gradient the projection before it wants, d gate = sum r * g.
    residual_norm:  d = g_x' + the norm's dx (in registers, no separate add), then dx = d, dr = gate * d,
                    d gate = sum r * d; xhat comes from the saved x' and e'.

Ops: `i2v::adaptive_norm_fwd(x, e, weight, bias, float eps, shift_x, scale_x, shift_e, scale_e) -> (out, mean,
rstd)`, `i2v::adaptive_norm_bwd(grad, x, e, weight, bias, mean, rstd, scale_x, scale_e) -> (dx, de, dwb, dmod)`,
`i2v::gated_residual_fwd(x, e, r, gate_x, gate_e) -> (x', e')`,
`i2v::gated_residual_bwd(grad_x, grad_e, r, gate_x, gate_e) -> (dr, dgates)`,
`i2v::residual_norm_fwd(x, e, r, gate_x, gate_e, weight, bias, eps, shift_x, scale_x, shift_e, scale_e) -> (x',
e', out, mean, rstd)` and `i2v::residual_norm_bwd(grad, grad_x', grad_e', x', e', r, gate_x, gate_e, weight,
bias, mean, rstd, scale_x, scale_e) -> (dx, de, dr, dwb, dmod, dgates)` (the small gradients stacked: a custom
op's outputs must not alias one another), with fake implementations (the meta device and torch.compile run
those) and autograd formulas. `adaptive_norm`, `gated_residual` and `residual_norm` are the public entries,
`*_ref` plain PyTorch with diffusers' maths.

Limits: x, e, r fp32, bf16 or fp16, the last dimension contiguous (other strides are read as they are);
the modulation vectors [B, C] with a contiguous last dimension (chunks of the linear's output are);
LayerNorm weight and bias both present (CogVideoX's `norm_elementwise_affine: true`; the block installer
refuses others); C <= 8192.

The interpreter converts fp32 to bf16 by truncation, where a GPU rounds to nearest even: under the
interpreter the stores add the rounding bias first (i2v.kernels.qk_norm_rope's helper), so the CPU tests
see the GPU's rounding.

Tested on the CPU under TRITON_INTERPRET=1 (tests/test_fused_block.py): the three ops' outputs and gradients
against the references in fp32 (within 3e-7 relative) and bf16 (error against an fp32 reference within twice
eager bf16's), opcheck, the fakes, a whole block against diffusers' forward and under torch.compile; the
kernels compile for sm_90 ahead of time at C = 3072 (triton's own ptxas). Not yet run or timed on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from i2v.kernels.qk_norm_rope import _INTERPRET, _round_to, kernel_runs_on

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_CHANNELS = 8192
_MAX_PROGRAMS = 256  # backward row ranges per stream and sample: fills a GPU; the partial sums stay small


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _stream_rows(s, text_len, b, stride_xb, stride_xs, stride_eb, stride_es):
    """Element offsets of joint rows s in the video (s >= text_len) and text (s < text_len) tensors."""
    t = tl.where(s >= text_len, s - text_len, 0).to(tl.int64)
    u = tl.where(s < text_len, s, 0).to(tl.int64)
    bb = b.to(tl.int64)
    return bb * stride_xb + t * stride_xs, bb * stride_eb + u * stride_es


@triton.jit
def _adaptive_norm_fwd(X, E, W, Bias, SHX, SCX, SHE, SCE, OUT, MEAN, RSTD, R, GX, GE, OX, OE,
                       stride_xb, stride_xs, stride_eb, stride_es, stride_mb, stride_rb, stride_rs, stride_gb,
                       S, text_len, C, eps,
                       RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, RNE_BF16: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    s = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    cm = cols < C
    row_ok = s < S
    video = (row_ok & (s >= text_len))[:, None] & cm[None, :]
    text = (row_ok & (s < text_len))[:, None] & cm[None, :]
    xo, eo = _stream_rows(s, text_len, b, stride_xb, stride_xs, stride_eb, stride_es)

    v = (tl.load(X + xo[:, None] + cols[None, :], mask=video, other=0.0).to(tl.float32)
         + tl.load(E + eo[:, None] + cols[None, :], mask=text, other=0.0).to(tl.float32))
    bb = b.to(tl.int64)
    if RESIDUAL:  # residual_norm: the streams are first x + gate_x r[:, St:] and e + gate_e r[:, :St]
        ro = bb * stride_rb + s.to(tl.int64) * stride_rs
        r = tl.load(R + ro[:, None] + cols[None, :], mask=video | text, other=0.0).to(tl.float32)
        gate = tl.where((s >= text_len)[:, None],
                        tl.load(GX + bb * stride_gb + cols, mask=cm, other=0.0).to(tl.float32)[None, :],
                        tl.load(GE + bb * stride_gb + cols, mask=cm, other=0.0).to(tl.float32)[None, :])
        v = _round_to(v + gate * r, OX.dtype.element_ty, RNE_BF16)
        t = tl.where(s >= text_len, s - text_len, 0).to(tl.int64)
        u = tl.where(s < text_len, s, 0).to(tl.int64)
        tl.store(OX + (bb * (S - text_len) + t)[:, None] * C + cols[None, :], v, mask=video)
        tl.store(OE + (bb * text_len + u)[:, None] * C + cols[None, :], v, mask=text)
        v = v.to(tl.float32)  # the norm sees the rounded stream, as diffusers' norm sees the stored one
    mean = tl.sum(v, 1) / C
    vc = tl.where(cm[None, :], v - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(vc * vc, 1) / C + eps)
    w = tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
    bias = tl.load(Bias + cols, mask=cm, other=0.0).to(tl.float32)
    n = vc * rstd[:, None] * w[None, :] + bias[None, :]

    # The modulation of each row's stream: both vectors are loaded masked, so each row reads one.
    mo = b.to(tl.int64) * stride_mb
    is_video = (s >= text_len)[:, None]
    shift = tl.where(is_video, tl.load(SHX + mo + cols, mask=cm, other=0.0).to(tl.float32)[None, :],
                     tl.load(SHE + mo + cols, mask=cm, other=0.0).to(tl.float32)[None, :])
    scale = tl.where(is_video, tl.load(SCX + mo + cols, mask=cm, other=0.0).to(tl.float32)[None, :],
                     tl.load(SCE + mo + cols, mask=cm, other=0.0).to(tl.float32)[None, :])
    out = n * (1.0 + scale) + shift

    rows = b.to(tl.int64) * S + s
    m2 = row_ok[:, None] & cm[None, :]
    tl.store(OUT + rows[:, None] * C + cols[None, :], _round_to(out, OUT.dtype.element_ty, RNE_BF16), mask=m2)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _stream_range(p, stream, text_len, S, rows_text, rows_video):
    """[first, end) of program p's rows in the joint sequence: stream 0 is the text, 1 the video."""
    first = tl.where(stream == 1, text_len + p * rows_video, p * rows_text)
    end = tl.where(stream == 1, tl.minimum(S, first + rows_video), tl.minimum(text_len, first + rows_text))
    return first, end


@triton.jit
def _adaptive_norm_bwd(G, X, E, W, Bias, SCX, SCE, MEAN, RSTD, DX, DE, MOD_PART, WB_PART,
                       GXO, GEO, R, GX, GE, DR, GATE_PART,
                       stride_gb, stride_gs, stride_xb, stride_xs, stride_eb, stride_es, stride_mb,
                       stride_gxb, stride_gxs, stride_geb, stride_ges, stride_rb, stride_rs, stride_gtb,
                       S, text_len, C, rows_text, rows_video, rows_max, P,
                       RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, RNE_BF16: tl.constexpr):
    p = tl.program_id(0)
    stream = tl.program_id(1)
    b = tl.program_id(2)
    B = tl.num_programs(2)
    cols = tl.arange(0, BLOCK_C)
    cm = cols < C
    first, end = _stream_range(p, stream, text_len, S, rows_text, rows_video)
    w = tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
    bias = tl.load(Bias + cols, mask=cm, other=0.0).to(tl.float32)
    mo = b.to(tl.int64) * stride_mb
    is_video = stream == 1
    scale = tl.where(is_video, tl.load(SCX + mo + cols, mask=cm, other=0.0).to(tl.float32),
                     tl.load(SCE + mo + cols, mask=cm, other=0.0).to(tl.float32))
    Sv = S - text_len
    d_shift = tl.zeros([BLOCK_C], tl.float32)
    d_scale = tl.zeros([BLOCK_C], tl.float32)
    d_w = tl.zeros([BLOCK_C], tl.float32)
    d_b = tl.zeros([BLOCK_C], tl.float32)
    d_gate = tl.zeros([BLOCK_C], tl.float32)
    if RESIDUAL:
        gate = tl.where(is_video, tl.load(GX + b.to(tl.int64) * stride_gtb + cols, mask=cm, other=0.0).to(tl.float32),
                        tl.load(GE + b.to(tl.int64) * stride_gtb + cols, mask=cm, other=0.0).to(tl.float32))
    for start in range(0, rows_max, BLOCK_R):
        s = first + start + tl.arange(0, BLOCK_R)
        row_ok = s < end
        m2 = row_ok[:, None] & cm[None, :]
        xo, eo = _stream_rows(s, text_len, b, stride_xb, stride_xs, stride_eb, stride_es)
        go = b.to(tl.int64) * stride_gb + s.to(tl.int64) * stride_gs
        g = tl.load(G + go[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        v = (tl.load(X + xo[:, None] + cols[None, :], mask=m2 & is_video, other=0.0).to(tl.float32)
             + tl.load(E + eo[:, None] + cols[None, :], mask=m2 & (stream == 0), other=0.0).to(tl.float32))
        rows = b.to(tl.int64) * S + s
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = tl.where(m2, (v - mean[:, None]) * rstd[:, None], 0.0)  # zero past the end: adds nothing
        n = xhat * w[None, :] + bias[None, :]
        d_shift += tl.sum(g, 0)
        d_scale += tl.sum(g * n, 0)
        dn = g * (1.0 + scale[None, :])
        d_w += tl.sum(dn * xhat, 0)
        d_b += tl.sum(dn, 0)
        dxhat = dn * w[None, :]
        c1 = tl.sum(dxhat * xhat, 1) / C
        c2 = tl.sum(dxhat, 1) / C
        dx = (dxhat - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if RESIDUAL:  # the stream's own gradient joins the norm's, then flows to x, e, r and the gates
            xg, eg = _stream_rows(s, text_len, b, stride_gxb, stride_gxs, stride_geb, stride_ges)
            dx += (tl.load(GXO + xg[:, None] + cols[None, :], mask=m2 & is_video, other=0.0).to(tl.float32)
                   + tl.load(GEO + eg[:, None] + cols[None, :], mask=m2 & (stream == 0), other=0.0).to(tl.float32))
            ro = b.to(tl.int64) * stride_rb + s.to(tl.int64) * stride_rs
            r = tl.load(R + ro[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
            d_gate += tl.sum(r * dx, 0)
            tl.store(DR + rows[:, None] * C + cols[None, :], _round_to(gate[None, :] * dx, DR.dtype.element_ty, RNE_BF16),
                     mask=m2)
        dx = _round_to(dx, DX.dtype.element_ty, RNE_BF16)
        t = tl.where(s >= text_len, s - text_len, 0).to(tl.int64)
        u = tl.where(s < text_len, s, 0).to(tl.int64)
        tl.store(DX + (b.to(tl.int64) * Sv + t)[:, None] * C + cols[None, :], dx, mask=m2 & is_video)
        tl.store(DE + (b.to(tl.int64) * text_len + u)[:, None] * C + cols[None, :], dx, mask=m2 & (stream == 0))
    # Partial sums: [2 streams, B, P, 2, C] for (d shift, d scale) and (d weight, d bias).
    part = ((stream * B + b) * P + p).to(tl.int64) * 2 * C
    tl.store(MOD_PART + part + cols, d_shift, mask=cm)
    tl.store(MOD_PART + part + C + cols, d_scale, mask=cm)
    tl.store(WB_PART + part + cols, d_w, mask=cm)
    tl.store(WB_PART + part + C + cols, d_b, mask=cm)
    if RESIDUAL:
        tl.store(GATE_PART + ((stream * B + b) * P + p).to(tl.int64) * C + cols, d_gate, mask=cm)


@triton.jit
def _gated_residual_fwd(X, E, R, GX, GE, OX, OE,
                        stride_xb, stride_xs, stride_eb, stride_es, stride_rb, stride_rs, stride_gb,
                        S, text_len, C,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, RNE_BF16: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    s = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    cm = cols < C
    row_ok = s < S
    m2 = row_ok[:, None] & cm[None, :]
    video = m2 & (s >= text_len)[:, None]
    text = m2 & (s < text_len)[:, None]
    xo, eo = _stream_rows(s, text_len, b, stride_xb, stride_xs, stride_eb, stride_es)
    v = (tl.load(X + xo[:, None] + cols[None, :], mask=video, other=0.0).to(tl.float32)
         + tl.load(E + eo[:, None] + cols[None, :], mask=text, other=0.0).to(tl.float32))
    ro = b.to(tl.int64) * stride_rb + s.to(tl.int64) * stride_rs
    r = tl.load(R + ro[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    go = b.to(tl.int64) * stride_gb
    gate = tl.where((s >= text_len)[:, None], tl.load(GX + go + cols, mask=cm, other=0.0).to(tl.float32)[None, :],
                    tl.load(GE + go + cols, mask=cm, other=0.0).to(tl.float32)[None, :])
    out = _round_to(v + gate * r, OX.dtype.element_ty, RNE_BF16)
    t = tl.where(s >= text_len, s - text_len, 0).to(tl.int64)
    u = tl.where(s < text_len, s, 0).to(tl.int64)
    bb = b.to(tl.int64)
    tl.store(OX + (bb * (S - text_len) + t)[:, None] * C + cols[None, :], out, mask=video)
    tl.store(OE + (bb * text_len + u)[:, None] * C + cols[None, :], out, mask=text)


@triton.jit
def _gated_residual_bwd(GX_OUT, GE_OUT, R, GX, GE, DR, PART,
                        stride_oxb, stride_oxs, stride_oeb, stride_oes, stride_rb, stride_rs, stride_gb,
                        S, text_len, C, rows_text, rows_video, rows_max, P,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, RNE_BF16: tl.constexpr):
    p = tl.program_id(0)
    stream = tl.program_id(1)
    b = tl.program_id(2)
    B = tl.num_programs(2)
    cols = tl.arange(0, BLOCK_C)
    cm = cols < C
    first, end = _stream_range(p, stream, text_len, S, rows_text, rows_video)
    is_video = stream == 1
    go = b.to(tl.int64) * stride_gb
    gate = tl.where(is_video, tl.load(GX + go + cols, mask=cm, other=0.0).to(tl.float32),
                    tl.load(GE + go + cols, mask=cm, other=0.0).to(tl.float32))
    d_gate = tl.zeros([BLOCK_C], tl.float32)
    for start in range(0, rows_max, BLOCK_R):
        s = first + start + tl.arange(0, BLOCK_R)
        m2 = (s < end)[:, None] & cm[None, :]
        xo, eo = _stream_rows(s, text_len, b, stride_oxb, stride_oxs, stride_oeb, stride_oes)
        g = (tl.load(GX_OUT + xo[:, None] + cols[None, :], mask=m2 & is_video, other=0.0).to(tl.float32)
             + tl.load(GE_OUT + eo[:, None] + cols[None, :], mask=m2 & (stream == 0), other=0.0).to(tl.float32))
        ro = b.to(tl.int64) * stride_rb + s.to(tl.int64) * stride_rs
        r = tl.load(R + ro[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        d_gate += tl.sum(r * g, 0)
        rows = b.to(tl.int64) * S + s
        tl.store(DR + rows[:, None] * C + cols[None, :], _round_to(gate[None, :] * g, DR.dtype.element_ty, RNE_BF16),
                 mask=m2)
    tl.store(PART + ((stream * B + b) * P + p).to(tl.int64) * C + cols, d_gate, mask=cm)


@triton.jit
def _sum_partials(PART, OUT, R, N, BLOCK_N: tl.constexpr, RNE_BF16: tl.constexpr):
    """OUT[g, n] = sum over r of PART[g, r, n] (fp32), rounded once to OUT's dtype: the backward's last step."""
    g = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = n < N
    acc = tl.zeros([BLOCK_N], tl.float32)
    for r in range(0, R):
        acc += tl.load(PART + (g * R + r) * N + n, mask=nm, other=0.0)
    tl.store(OUT + g * N + n, _round_to(acc, OUT.dtype.element_ty, RNE_BF16), mask=nm)


# ----------------------------------------------------------------------------- host side


def _rne_bf16(dtype: torch.dtype) -> bool:
    return _INTERPRET and dtype == torch.bfloat16


def _tiles(c: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps): a row of C channels per tile row, about 4K elements per tile on a GPU
    (the interpreter pays per op, so taller tiles there)."""
    block_c = triton.next_power_of_2(c)
    block_r = 16 if _INTERPRET else max(1, 4096 // block_c)
    return block_r, block_c, 8 if block_c >= 2048 else 4


def _row_ranges(text_len: int, video_len: int, block_r: int) -> tuple[int, int, int, int]:
    """(P, rows per text program, rows per video program, most rows of any program) for the backward grids."""
    longest = max(text_len, video_len, 1)
    programs = max(1, min(triton.cdiv(longest, block_r), _MAX_PROGRAMS))
    rows_text, rows_video = triton.cdiv(text_len, programs), triton.cdiv(video_len, programs)
    return programs, rows_text, rows_video, triton.cdiv(max(rows_text, rows_video), block_r) * block_r


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _same_rows(*vectors: torch.Tensor) -> list[torch.Tensor]:
    """[B, C] vectors that the kernels read with one row stride and contiguous channels (chunks of the
    modulation linear's output are), copied contiguous where they are not."""
    if all(t.stride(1) == 1 and t.stride(0) == vectors[0].stride(0) for t in vectors):
        return list(vectors)
    return [t.contiguous() for t in vectors]


def _reduce(part: torch.Tensor, groups: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """part (fp32, contiguous) as [groups, R, width] summed over R: [groups, width] in `dtype`, in one launch.

    The partials are small ([.., C] per backward program); one kernel sums and casts them where torch would
    take two launches. The order of the sum is fixed, so it is deterministic."""
    out = torch.empty((groups, width), dtype=dtype, device=part.device)
    if groups:
        block = min(1024, triton.next_power_of_2(width))
        _sum_partials[(groups, triton.cdiv(width, block))](part, out, part.numel() // (groups * width), width,
                                                           BLOCK_N=block, RNE_BF16=_rne_bf16(dtype))
    return out


def _norm_fwd(x, e, weight, bias, eps, shift_x, scale_x, shift_e, scale_e, residual=None):
    """(out, mean, rstd); with residual = (r, gate_x, gate_e) the streams are first x + gate_x r[:, St:] and
    e + gate_e r[:, :St], returned as well: (x1, e1, out, mean, rstd)."""
    b, sv, c = x.shape
    st = e.shape[1]
    s = st + sv
    out = torch.empty((b, s, c), dtype=x.dtype, device=x.device)
    mean = torch.empty(b * s, dtype=torch.float32, device=x.device)
    rstd = torch.empty(b * s, dtype=torch.float32, device=x.device)
    x1 = torch.empty((b, sv, c), dtype=x.dtype, device=x.device) if residual else x
    e1 = torch.empty((b, st, c), dtype=e.dtype, device=x.device) if residual else e
    result = (x1, e1, out, mean, rstd) if residual else (out, mean, rstd)
    if b * s == 0:
        return result
    x, e = _last_dim_contiguous(x), _last_dim_contiguous(e)
    mods = _same_rows(shift_x, scale_x, shift_e, scale_e)
    r, gates = (_last_dim_contiguous(residual[0]), _same_rows(*residual[1:])) if residual else (x, [x, x])
    block_r, block_c, warps = _tiles(c)
    _adaptive_norm_fwd[(triton.cdiv(s, block_r), b)](
        x, e, weight.contiguous(), bias.contiguous(), *mods, out, mean, rstd, r, *gates, x1, e1,
        x.stride(0), x.stride(1), e.stride(0), e.stride(1), mods[0].stride(0), r.stride(0), r.stride(1),
        gates[0].stride(0),
        s, st, c, eps,
        RESIDUAL=residual is not None, BLOCK_R=block_r, BLOCK_C=block_c, RNE_BF16=_rne_bf16(x.dtype),
        num_warps=warps)
    return result


def _norm_bwd(grad, x, e, weight, bias, mean, rstd, scale_x, scale_e, residual=None):
    """(dx, de, dwb, dmod); with residual = (grad_x1, grad_e1, r, gate_x, gate_e), x and e are the saved x1, e1,
    the streams' own gradients join the norm's, and (dx, de, dr, dwb, dmod, dgates) is returned."""
    b, sv, c = x.shape
    st = e.shape[1]
    s = st + sv
    dx = torch.empty((b, sv, c), dtype=x.dtype, device=x.device)
    de = torch.empty((b, st, c), dtype=e.dtype, device=x.device)
    block_r, block_c, warps = _tiles(c)
    programs, rows_text, rows_video, rows_max = _row_ranges(st, sv, block_r)
    mod_part = torch.empty((2, b, programs, 2, c), dtype=torch.float32, device=x.device)
    wb_part = torch.empty((2, b, programs, 2, c), dtype=torch.float32, device=x.device)
    gate_part = torch.empty((2, b, programs, c) if residual else (0,), dtype=torch.float32, device=x.device)
    dr = torch.empty((b, s, c), dtype=residual[2].dtype, device=x.device) if residual else dx
    if b * s:
        grad, x, e = (_last_dim_contiguous(t) for t in (grad, x, e))
        mods = _same_rows(scale_x, scale_e)
        if residual:
            gxo, geo, r = (_last_dim_contiguous(t) for t in residual[:3])
            gates = _same_rows(*residual[3:])
        else:
            gxo, geo, r, gates = grad, grad, grad, [grad, grad]
        _adaptive_norm_bwd[(programs, 2, b)](
            grad, x, e, weight.contiguous(), bias.contiguous(), *mods, mean, rstd, dx, de, mod_part, wb_part,
            gxo, geo, r, *gates, dr, gate_part,
            grad.stride(0), grad.stride(1), x.stride(0), x.stride(1), e.stride(0), e.stride(1), mods[0].stride(0),
            gxo.stride(0), gxo.stride(1), geo.stride(0), geo.stride(1), r.stride(0), r.stride(1), gates[0].stride(0),
            s, st, c, rows_text, rows_video, rows_max, programs,
            RESIDUAL=residual is not None, BLOCK_R=block_r, BLOCK_C=block_c, RNE_BF16=_rne_bf16(x.dtype),
            num_warps=warps)
    else:  # every program writes its partial sums; with no rows there are none to run
        mod_part.zero_()
        wb_part.zero_()
        gate_part.zero_()
    # [(weight, bias), C] and [2 streams (text, video), B, (shift, scale), C]
    dwb = _reduce(wb_part, 1, 2 * c, weight.dtype).view(2, c)
    dmod = _reduce(mod_part, 2 * b, 2 * c, scale_x.dtype).view(2, b, 2, c)
    if not residual:
        return dx, de, dwb, dmod
    return dx, de, dr, dwb, dmod, _reduce(gate_part, 2 * b, c, residual[3].dtype).view(2, b, c)


def _residual_fwd(x, e, r, gate_x, gate_e):
    b, sv, c = x.shape
    st = e.shape[1]
    s = st + sv
    out_x = torch.empty((b, sv, c), dtype=x.dtype, device=x.device)
    out_e = torch.empty((b, st, c), dtype=e.dtype, device=x.device)
    if b * s == 0:
        return out_x, out_e
    x, e, r = (_last_dim_contiguous(t) for t in (x, e, r))
    gates = _same_rows(gate_x, gate_e)
    block_r, block_c, warps = _tiles(c)
    _gated_residual_fwd[(triton.cdiv(s, block_r), b)](
        x, e, r, *gates, out_x, out_e,
        x.stride(0), x.stride(1), e.stride(0), e.stride(1), r.stride(0), r.stride(1), gates[0].stride(0),
        s, st, c,
        BLOCK_R=block_r, BLOCK_C=block_c, RNE_BF16=_rne_bf16(x.dtype), num_warps=warps)
    return out_x, out_e


def _residual_bwd(grad_x, grad_e, r, gate_x, gate_e):
    b, sv, c = grad_x.shape
    st = grad_e.shape[1]
    s = st + sv
    dr = torch.empty((b, s, c), dtype=r.dtype, device=r.device)
    block_r, block_c, warps = _tiles(c)
    programs, rows_text, rows_video, rows_max = _row_ranges(st, sv, block_r)
    part = torch.empty((2, b, programs, c), dtype=torch.float32, device=r.device)
    if b * s:
        grad_x, grad_e, r = (_last_dim_contiguous(t) for t in (grad_x, grad_e, r))
        gates = _same_rows(gate_x, gate_e)
        _gated_residual_bwd[(programs, 2, b)](
            grad_x, grad_e, r, *gates, dr, part,
            grad_x.stride(0), grad_x.stride(1), grad_e.stride(0), grad_e.stride(1), r.stride(0), r.stride(1),
            gates[0].stride(0),
            s, st, c, rows_text, rows_video, rows_max, programs,
            BLOCK_R=block_r, BLOCK_C=block_c, RNE_BF16=_rne_bf16(r.dtype), num_warps=warps)
    else:
        part.zero_()
    return dr, _reduce(part, 2 * b, c, gate_x.dtype).view(2, b, c)  # [2 streams (text, video), B, C]


# ----------------------------------------------------------------------------- custom ops


def _joint_like(x, e):
    b, sv, c = x.shape
    return x.new_empty((b, e.shape[1] + sv, c))


@torch.library.custom_op("i2v::adaptive_norm_fwd", mutates_args=())
def adaptive_norm_fwd(x: torch.Tensor, e: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                      shift_x: torch.Tensor, scale_x: torch.Tensor, shift_e: torch.Tensor, scale_e: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, mean, rstd): out [B, St + Sv, C] in x's dtype (text rows first); mean, rstd [B * (St + Sv)] fp32."""
    return _norm_fwd(x, e, weight, bias, eps, shift_x, scale_x, shift_e, scale_e)


@adaptive_norm_fwd.register_fake
def _adaptive_norm_fwd_fake(x, e, weight, bias, eps, shift_x, scale_x, shift_e, scale_e):
    rows = x.shape[0] * (x.shape[1] + e.shape[1])
    return _joint_like(x, e), x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("i2v::adaptive_norm_bwd", mutates_args=())
def adaptive_norm_bwd(grad: torch.Tensor, x: torch.Tensor, e: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, scale_x: torch.Tensor,
                      scale_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, de, dwb, dmod): dwb [(weight, bias), C] in weight's dtype, dmod [(text, video), B, (shift, scale), C]
    in scale_x's dtype (one tensor each: a custom op's outputs must not alias one another)."""
    return _norm_bwd(grad, x, e, weight, bias, mean, rstd, scale_x, scale_e)


@adaptive_norm_bwd.register_fake
def _adaptive_norm_bwd_fake(grad, x, e, weight, bias, mean, rstd, scale_x, scale_e):
    b, c = x.shape[0], x.shape[2]
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(e, memory_format=torch.contiguous_format),
            weight.new_empty((2, c)), scale_x.new_empty((2, b, 2, c)))


def _norm_setup_context(ctx, inputs, output):
    x, e, weight, bias, eps, shift_x, scale_x, shift_e, scale_e = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, e, weight, bias, mean, rstd, scale_x, scale_e)
    ctx.mark_non_differentiable(mean, rstd)


def _norm_backward(ctx, grad, _dmean, _drstd):
    x, e, weight, bias, mean, rstd, scale_x, scale_e = ctx.saved_tensors
    dx, de, dwb, dmod = adaptive_norm_bwd(grad, x, e, weight, bias, mean, rstd, scale_x, scale_e)
    grads = (dx, de, dwb[0], dwb[1], None, dmod[1, :, 0], dmod[1, :, 1], dmod[0, :, 0], dmod[0, :, 1])
    return tuple(g if g is not None and ctx.needs_input_grad[i] else None for i, g in enumerate(grads))


adaptive_norm_fwd.register_autograd(_norm_backward, setup_context=_norm_setup_context)


@torch.library.custom_op("i2v::residual_norm_fwd", mutates_args=())
def residual_norm_fwd(x: torch.Tensor, e: torch.Tensor, r: torch.Tensor, gate_x: torch.Tensor, gate_e: torch.Tensor,
                      weight: torch.Tensor, bias: torch.Tensor, eps: float, shift_x: torch.Tensor,
                      scale_x: torch.Tensor, shift_e: torch.Tensor, scale_e: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x1, e1, out, mean, rstd): the gated residual (x1, e1), then the adaptive norm of it joined (out)."""
    return _norm_fwd(x, e, weight, bias, eps, shift_x, scale_x, shift_e, scale_e, residual=(r, gate_x, gate_e))


@residual_norm_fwd.register_fake
def _residual_norm_fwd_fake(x, e, r, gate_x, gate_e, weight, bias, eps, shift_x, scale_x, shift_e, scale_e):
    rows = x.shape[0] * (x.shape[1] + e.shape[1])
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(e, memory_format=torch.contiguous_format), _joint_like(x, e),
            x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32))


@torch.library.custom_op("i2v::residual_norm_bwd", mutates_args=())
def residual_norm_bwd(grad: torch.Tensor, grad_x1: torch.Tensor, grad_e1: torch.Tensor, x1: torch.Tensor,
                      e1: torch.Tensor, r: torch.Tensor, gate_x: torch.Tensor, gate_e: torch.Tensor,
                      weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                      scale_x: torch.Tensor, scale_e: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, de, dr, dwb, dmod, dgates): dwb and dmod as adaptive_norm_bwd's, dgates [(text, video), B, C]."""
    return _norm_bwd(grad, x1, e1, weight, bias, mean, rstd, scale_x, scale_e,
                     residual=(grad_x1, grad_e1, r, gate_x, gate_e))


@residual_norm_bwd.register_fake
def _residual_norm_bwd_fake(grad, grad_x1, grad_e1, x1, e1, r, gate_x, gate_e, weight, bias, mean, rstd, scale_x,
                            scale_e):
    b, c = x1.shape[0], x1.shape[2]
    return (torch.empty_like(x1, memory_format=torch.contiguous_format),
            torch.empty_like(e1, memory_format=torch.contiguous_format), r.new_empty(grad.shape),
            weight.new_empty((2, c)), scale_x.new_empty((2, b, 2, c)), gate_x.new_empty((2, b, c)))


def _residual_norm_setup_context(ctx, inputs, output):
    x, e, r, gate_x, gate_e, weight, bias, eps, shift_x, scale_x, shift_e, scale_e = inputs
    x1, e1, _, mean, rstd = output
    ctx.save_for_backward(x1, e1, r, gate_x, gate_e, weight, bias, mean, rstd, scale_x, scale_e)
    ctx.mark_non_differentiable(mean, rstd)


def _residual_norm_backward(ctx, grad_x1, grad_e1, grad, _dmean, _drstd):
    x1, e1, r, gate_x, gate_e, weight, bias, mean, rstd, scale_x, scale_e = ctx.saved_tensors
    dx, de, dr, dwb, dmod, dgates = residual_norm_bwd(grad, grad_x1, grad_e1, x1, e1, r, gate_x, gate_e, weight,
                                                      bias, mean, rstd, scale_x, scale_e)
    grads = (dx, de, dr, dgates[1], dgates[0], dwb[0], dwb[1], None, dmod[1, :, 0], dmod[1, :, 1], dmod[0, :, 0],
             dmod[0, :, 1])
    return tuple(g if g is not None and ctx.needs_input_grad[i] else None for i, g in enumerate(grads))


residual_norm_fwd.register_autograd(_residual_norm_backward, setup_context=_residual_norm_setup_context)


@torch.library.custom_op("i2v::gated_residual_fwd", mutates_args=())
def gated_residual_fwd(x: torch.Tensor, e: torch.Tensor, r: torch.Tensor, gate_x: torch.Tensor,
                       gate_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + gate_x * r[:, St:], e + gate_e * r[:, :St]), new contiguous tensors in x's and e's dtypes."""
    return _residual_fwd(x, e, r, gate_x, gate_e)


@gated_residual_fwd.register_fake
def _gated_residual_fwd_fake(x, e, r, gate_x, gate_e):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(e, memory_format=torch.contiguous_format))


@torch.library.custom_op("i2v::gated_residual_bwd", mutates_args=())
def gated_residual_bwd(grad_x: torch.Tensor, grad_e: torch.Tensor, r: torch.Tensor, gate_x: torch.Tensor,
                       gate_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dr, dgates): dr [B, St + Sv, C] in r's dtype, dgates [(text, video), B, C] in the gates' dtype."""
    return _residual_bwd(grad_x, grad_e, r, gate_x, gate_e)


@gated_residual_bwd.register_fake
def _gated_residual_bwd_fake(grad_x, grad_e, r, gate_x, gate_e):
    b, sv, c = grad_x.shape
    return r.new_empty((b, grad_e.shape[1] + sv, c)), gate_x.new_empty((2, b, c))


def _residual_setup_context(ctx, inputs, output):
    x, e, r, gate_x, gate_e = inputs
    ctx.save_for_backward(r, gate_x, gate_e)


def _residual_backward(ctx, grad_x, grad_e):
    r, gate_x, gate_e = ctx.saved_tensors
    need = ctx.needs_input_grad
    dr = dgate_x = dgate_e = None
    if need[2] or need[3] or need[4]:
        dr, dgates = gated_residual_bwd(grad_x, grad_e, r, gate_x, gate_e)
        dgate_e, dgate_x = dgates[0], dgates[1]
    # The residual path's gradient is the output's own: passed through, never copied.
    return (grad_x if need[0] else None, grad_e if need[1] else None, dr if need[2] else None,
            dgate_x if need[3] else None, dgate_e if need[4] else None)


gated_residual_fwd.register_autograd(_residual_backward, setup_context=_residual_setup_context)


# ----------------------------------------------------------------------------- public entries


def _check_streams(what: str, x, e):
    if x.dim() != 3 or e.dim() != 3 or x.shape[0] != e.shape[0] or x.shape[2] != e.shape[2]:
        raise ValueError(f"{what}: video and text must be [B, Sv, C] and [B, St, C], got {tuple(x.shape)}, "
                         f"{tuple(e.shape)}")
    if x.dtype not in _DTYPES or e.dtype != x.dtype:
        raise ValueError(f"{what}: video and text must share one of fp16/bf16/fp32, got {x.dtype}, {e.dtype}")
    if x.shape[2] > _MAX_CHANNELS:
        raise ValueError(f"{what}: at most {_MAX_CHANNELS} channels, got {x.shape[2]}")
    if not kernel_runs_on(x):
        raise ValueError(f"{what}: needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)")


def _check_vectors(what: str, b: int, c: int, device, **vectors):
    for name, t in vectors.items():
        if t.shape != (b, c):
            raise ValueError(f"{what}: {name} must be [B, C] = [{b}, {c}], got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{what}: {name} is on {t.device}, the activations on {device}")


def adaptive_norm(x: torch.Tensor, e: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                  shift_x: torch.Tensor, scale_x: torch.Tensor, shift_e: torch.Tensor, scale_e: torch.Tensor
                  ) -> torch.Tensor:
    """[LN(e) (1 + scale_e) + shift_e, LN(x) (1 + scale_x) + shift_x] joined along tokens: [B, St + Sv, C]."""
    _check_streams("adaptive_norm", x, e)
    b, _, c = x.shape
    if weight is None or bias is None:
        raise ValueError("adaptive_norm: needs the LayerNorm's weight and bias (an affine norm)")
    _check_vectors("adaptive_norm", b, c, x.device, shift_x=shift_x, scale_x=scale_x, shift_e=shift_e,
                   scale_e=scale_e)
    if weight.shape != (c,) or bias.shape != (c,):
        raise ValueError(f"adaptive_norm: weight and bias must be [{c}], got {tuple(weight.shape)}, "
                         f"{tuple(bias.shape)}")
    return adaptive_norm_fwd(x, e, weight, bias, float(eps), shift_x, scale_x, shift_e, scale_e)[0]


def gated_residual(x: torch.Tensor, e: torch.Tensor, r: torch.Tensor, gate_x: torch.Tensor,
                   gate_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + gate_x r[:, St:], e + gate_e r[:, :St]) for r the joint [B, St + Sv, C] output of a layer."""
    _check_streams("gated_residual", x, e)
    b, sv, c = x.shape
    if r.shape != (b, e.shape[1] + sv, c) or r.dtype != x.dtype:
        raise ValueError(f"gated_residual: r must be [B, St + Sv, C] = [{b}, {e.shape[1] + sv}, {c}] in {x.dtype}, "
                         f"got {tuple(r.shape)} in {r.dtype}")
    _check_vectors("gated_residual", b, c, x.device, gate_x=gate_x, gate_e=gate_e)
    return gated_residual_fwd(x, e, r, gate_x, gate_e)


def residual_norm(x: torch.Tensor, e: torch.Tensor, r: torch.Tensor, gate_x: torch.Tensor, gate_e: torch.Tensor,
                  weight: torch.Tensor, bias: torch.Tensor, eps: float, shift_x: torch.Tensor, scale_x: torch.Tensor,
                  shift_e: torch.Tensor, scale_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x1, e1, adaptive_norm(x1, e1, ...)) for (x1, e1) = gated_residual(x, e, r, gate_x, gate_e), in one launch
    each way: the attention's residual and the feed-forward's norm of a block."""
    _check_streams("residual_norm", x, e)
    b, sv, c = x.shape
    if r.shape != (b, e.shape[1] + sv, c) or r.dtype != x.dtype:
        raise ValueError(f"residual_norm: r must be [B, St + Sv, C] = [{b}, {e.shape[1] + sv}, {c}] in {x.dtype}, "
                         f"got {tuple(r.shape)} in {r.dtype}")
    if weight is None or bias is None:
        raise ValueError("residual_norm: needs the LayerNorm's weight and bias (an affine norm)")
    if weight.shape != (c,) or bias.shape != (c,):
        raise ValueError(f"residual_norm: weight and bias must be [{c}], got {tuple(weight.shape)}, "
                         f"{tuple(bias.shape)}")
    _check_vectors("residual_norm", b, c, x.device, gate_x=gate_x, gate_e=gate_e, shift_x=shift_x, scale_x=scale_x,
                   shift_e=shift_e, scale_e=scale_e)
    x1, e1, out, _, _ = residual_norm_fwd(x, e, r, gate_x, gate_e, weight, bias, float(eps), shift_x, scale_x,
                                          shift_e, scale_e)
    return x1, e1, out


def residual_norm_ref(x, e, r, gate_x, gate_e, weight, bias, eps, shift_x, scale_x, shift_e, scale_e):
    """Plain PyTorch: gated_residual_ref, then adaptive_norm_ref of its result."""
    x1, e1 = gated_residual_ref(x, e, r, gate_x, gate_e)
    return x1, e1, adaptive_norm_ref(x1, e1, weight, bias, eps, shift_x, scale_x, shift_e, scale_e)


def adaptive_norm_ref(x, e, weight, bias, eps, shift_x, scale_x, shift_e, scale_e) -> torch.Tensor:
    """Plain PyTorch, diffusers' CogVideoXLayerNormZero after its linear, joined text first."""
    def modulate(t, shift, scale):
        n = torch.nn.functional.layer_norm(t, (t.shape[-1],), weight, bias, eps)
        return n * (1 + scale)[:, None, :] + shift[:, None, :]

    return torch.cat([modulate(e, shift_e, scale_e), modulate(x, shift_x, scale_x)], dim=1)


def gated_residual_ref(x, e, r, gate_x, gate_e) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch, diffusers' CogVideoXBlock: the residual adds on the slices of the joint output."""
    text_len = e.shape[1]
    return x + gate_x[:, None, :] * r[:, text_len:], e + gate_e[:, None, :] * r[:, :text_len]
