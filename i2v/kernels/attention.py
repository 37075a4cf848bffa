"""Fused flash attention (forward and backward) for the DiT's joint text+video self-attention.

    O = softmax(Q K^T * scale) V        Q [B, H, Sq, D], K, V [B, H, Sk, D], non-causal, no mask

Forward: one program per (BLOCK_M query rows, batch*head) streams over K/V blocks with an
online softmax in base 2 (exp2, the scale pre-multiplied by log2(e)), fp32 accumulators, and
saves the per-row logsumexp (base 2, fp32, [B*H, Sq]) for the backward.

Backward, split in three launches:
  1. delta = rowsum(O * dO)                       (one cheap pass, fp32)
  2. dK, dV: one program per K/V block, looping over all query blocks (P recomputed from LSE)
  3. dQ:     one program per query block, looping over all K/V blocks
Every gradient is accumulated in registers by the one program that owns its rows, so there
are no atomics, no fp32 dQ scratch buffer and the gradients are bit-reproducible for a given
tile config (autotuning may pick another config in another process: TRITON_CACHE_AUTOTUNING=1
keeps the first choice on disk). The price is recomputing Q K^T and dO V^T in
launch 3: 7 block matmuls per (query, key) block pair instead of 5. At S ~ 17.8k and B*H >= 30
each launch has thousands of programs, so the split costs no parallelism.

Lengths: any Sq, Sk >= 1. Full blocks run unmasked; only the single ragged tail block is
masked, in the kernel (no host-side padding copies). Strides: every input, dO and the
outputs are read/written through their own strides, so [B, S, H, D] projections viewed as
[B, H, S, D] need no copy. O is allocated as [B, S, H, D] storage returned as the
[B, H, S, D] view: the processor's transpose+reshape to [B, S, H*D] is then free.

dtypes: fp16, bf16 (tensor-core dots, P and dS rounded to the input dtype before their dot,
as every flash kernel does), fp32 (dots in IEEE fp32, or TF32 when
torch.backends.cuda.matmul.allow_tf32 is set, matching what torch would do).
Head dims: 16, 32, 64, 128 (powers of two; 64 and 128 are the CogVideoX sizes, 16/32 serve
tiny test models).

Tested (CPU, TRITON_INTERPRET=1, tests/test_attention_kernel.py): lengths 1, 17, 77, 130,
333 (and Sq != Sk), head dims 64 and 128 (16 and 32 in the smaller tests and the processor
test), fp32/fp16/bf16 and autocast, forward and backward, against an fp64 reference with tolerance 2 x (torch SDPA's own error
at that dtype) + 1e-5; strided inputs give bit-identical results. Under the interpreter bf16
blocks are upcast to fp32 right after loading (the interpreter multiplies bf16 bit patterns),
so the bf16 rounding of P is not exercised on CPU.
Compiled ahead of time for sm_90a with triton 3.7 and its bundled ptxas: every pruned bf16
config at D=64 and 128 (register use and spills checked; the pruning rules come from
that), first/last pruned configs for fp16/fp32 and D=16. Run on one NVIDIA H200 (torch 2.11,
triton 3.6; bench/results/attention-nvidia-h200.json, from bench/attention.py): in bf16 at
S=17,776, D=64 (2 heads) O, dQ, dK and dV are no further from an fp32 reference than SDPA's
flash backend, and at the 5B's 48 heads it runs 427 TFLOP/s forward and 354 backward, 0.90x
cuDNN SDPA forward+backward. Other shapes and dtypes have not been checked on a GPU. Limits: no causal mode,
no attention mask, no dropout, head dim <= 128; the first call per (H, Sq, Sk, D, dtype)
autotunes on a GPU (about a minute).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from i2v.kernels.backends import resolve_backend

# triton.jit reads this at decoration time; the kernels below follow whatever it decided.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = 1.4426950408889634
_HEAD_DIMS = (16, 32, 64, 128)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- autotune


def _configs(outer: str, inner: str, outer_sizes, inner_sizes, warps, stages):
    if _INTERPRET:
        # The interpreter cannot benchmark; big blocks keep its per-op cost low.
        return [triton.Config({outer: 128, inner: 128}, num_warps=4, num_stages=1)]
    return [
        triton.Config({outer: bo, inner: bi}, num_warps=w, num_stages=s)
        for bo in outer_sizes
        for bi in inner_sizes
        for w in warps
        for s in stages
    ]


def _hopper_prune(outer: str, inner: str, tiles_per_stage: int, resident_tiles: int, reg_tiles: float,
                  score_tiles: int, min_inner_16bit: int = 32):
    """Drop configs that cannot fit, or spill heavily, on an H100/H200 (saves tuning time).

    Shared memory (227 KB per block on Hopper) must hold the resident tiles (the block this
    program owns) plus `num_stages` copies of the streamed tiles. Registers: an estimate of
    the fp32 words per thread held live, `reg_tiles` outer x head_dim tiles (accumulators and
    owned operands) plus `score_tiles` outer x inner tiles (S/P, dP/dS); above 160, ptxas
    (triton 3.7, sm_90a) spills hundreds of bytes. For 16-bit inputs, streamed blocks shorter
    than `min_inner_16bit` are too short a step to hide their loads.
    """

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        d = args["HEAD_DIM"]
        elt = args["Q"].element_size()
        kept = []
        for c in configs:
            bo, bi = c.kwargs[outer], c.kwargs[inner]
            smem = (resident_tiles * bo + c.num_stages * tiles_per_stage * bi) * d * elt
            regs = (reg_tiles * bo * d * (2 if elt == 4 else 1) + score_tiles * bo * bi) / (32 * c.num_warps)
            if smem > 200 * 1024 or regs > 160:
                continue
            if elt == 2 and bi < min_inner_16bit:
                continue
            kept.append(c)
        return kept or configs[:1]

    return prune


# ----------------------------------------------------------------------------- forward


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, k_base, v_base, lo, hi, n_k, stride_kn, stride_kd, stride_vn, stride_vd,
               qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k_ptrs = k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd
        v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if MASK:
            valid = cols < n_k
            k = tl.load(k_ptrs, mask=valid[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASK:
            s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.autotune(
    configs=_configs("BLOCK_M", "BLOCK_N", (64, 128), (32, 64, 128), (4, 8), (2, 3, 4)),
    key=["H", "N_Q", "N_K", "HEAD_DIM"],  # H: the grid size matters to the best tile
    prune_configs_by={"early_config_prune": _hopper_prune("BLOCK_M", "BLOCK_N", 2, 1, 1.5, 1, 64)},
)
@triton.jit
def _attn_fwd(Q, K, V, O, LSE,
              stride_qb, stride_qh, stride_qm, stride_qd,
              stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd,
              stride_ob, stride_oh, stride_om, stride_od,
              H, N_Q, N_K, qk_scale,
              HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N_Q

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_full = (N_K // BLOCK_N) * BLOCK_N
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, 0, n_full, N_K,
                               stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
                               HEAD_DIM, BLOCK_N, False, UPCAST, PRECISION)
    # The ragged tail (at most one block; none when BLOCK_N divides N_K) is the only masked one.
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, n_full, N_K, N_K,
                               stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
                               HEAD_DIM, BLOCK_N, True, UPCAST, PRECISION)

    o = acc / l_i[:, None]
    tl.store(LSE + pid_bh.to(tl.int64) * N_Q + offs_m, m_i + tl.log2(l_i), mask=row_ok)
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             o.to(O.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------- backward


@triton.jit
def _bwd_delta(O, DO, DELTA,
               stride_ob, stride_oh, stride_om, stride_od,
               stride_db, stride_dh, stride_dm, stride_dd,
               H, N_Q,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N_Q
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dm + offs_d[None, :] * stride_dd,
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * N_Q + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _bwd_kv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, lo, hi, n_q,
                  stride_qm, stride_qd, stride_dm, stride_dd, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASK: tl.constexpr,
                  UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q_ptrs = q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd
        do_ptrs = do_base + rows[:, None] * stride_dm + offs_d[None, :] * stride_dd
        if MASK:
            valid = rows < n_q
            q = tl.load(q_ptrs, mask=valid[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=valid[:, None], other=0.0)
            # +inf logsumexp makes P exactly 0 on rows past the end.
            lse = tl.load(lse_base + rows, mask=valid, other=float("inf"))
            delta = tl.load(delta_base + rows, mask=valid, other=0.0)
        else:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
            lse = tl.load(lse_base + rows)
            delta = tl.load(delta_base + rows)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        # Work on the transposed tiles (keys along rows) so P^T and dS^T need no transposes.
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.autotune(
    configs=_configs("BLOCK_N", "BLOCK_M", (32, 64, 128), (16, 32, 64), (4, 8), (2, 3)),
    key=["H", "N_Q", "N_K", "HEAD_DIM"],  # H: the grid size matters to the best tile
    prune_configs_by={"early_config_prune": _hopper_prune("BLOCK_N", "BLOCK_M", 2, 2, 3, 2, 16)},
)
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV,
                   stride_qb, stride_qh, stride_qm, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_db, stride_dh, stride_dm, stride_dd,
                   stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                   stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                   H, N_Q, N_K, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < N_K

    # Key rows past the end load as zeros; their dK/dV rows are garbage and never stored.
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=col_ok[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=col_ok[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_db + h * stride_dh
    lse_base = LSE + pid_bh.to(tl.int64) * N_Q
    delta_base = DELTA + pid_bh.to(tl.int64) * N_Q

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    m_full = (N_Q // BLOCK_M) * BLOCK_M
    dk, dv = _bwd_kv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, 0, m_full, N_Q,
                           stride_qm, stride_qd, stride_dm, stride_dd, qk_scale,
                           HEAD_DIM, BLOCK_M, False, UPCAST, PRECISION)
    dk, dv = _bwd_kv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, m_full, N_Q, N_Q,
                           stride_qm, stride_qd, stride_dm, stride_dd, qk_scale,
                           HEAD_DIM, BLOCK_M, True, UPCAST, PRECISION)

    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _bwd_q_inner(dq, q, do, lse, delta, k_base, v_base, lo, hi, n_k,
                 stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k_ptrs = k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd
        v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if MASK:
            # Zero key rows past the end contribute dS * 0 to dQ, so no score masking is needed.
            valid = cols < n_k
            k = tl.load(k_ptrs, mask=valid[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.autotune(
    configs=_configs("BLOCK_M", "BLOCK_N", (64, 128), (32, 64), (4, 8), (2, 3)),
    key=["H", "N_Q", "N_K", "HEAD_DIM"],  # H: the grid size matters to the best tile
    prune_configs_by={"early_config_prune": _hopper_prune("BLOCK_M", "BLOCK_N", 2, 2, 2, 2)},
)
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ,
                 stride_qb, stride_qh, stride_qm, stride_qd,
                 stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd,
                 stride_db, stride_dh, stride_dm, stride_dd,
                 stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                 H, N_Q, N_K, qk_scale, sm_scale,
                 HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N_Q

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dm + offs_d[None, :] * stride_dd,
                 mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * N_Q + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * N_Q + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_full = (N_K // BLOCK_N) * BLOCK_N
    dq = _bwd_q_inner(dq, q, do, lse, delta, k_base, v_base, 0, n_full, N_K,
                      stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
                      HEAD_DIM, BLOCK_N, False, UPCAST, PRECISION)
    dq = _bwd_q_inner(dq, q, do, lse, delta, k_base, v_base, n_full, N_K, N_K,
                      stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
                      HEAD_DIM, BLOCK_N, True, UPCAST, PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------- host side


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"flash_attention: {name} must be [B, H, S, D], got shape {tuple(t.shape)}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"flash_attention: q, k, v must share one dtype of fp16/bf16/fp32, "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"flash_attention: expected q [B, H, Sq, D] and k, v [B, H, Sk, D], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[3] not in _HEAD_DIMS:
        raise ValueError(f"flash_attention: head dim must be one of {_HEAD_DIMS}, got {q.shape[3]}")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError("flash_attention: sequence lengths must be >= 1")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attention: q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    if not q.is_cuda and not _INTERPRET:
        raise ValueError("flash_attention: backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU "
                         "interpreter); use backend='torch' on CPU")


def _flags(dtype: torch.dtype):
    upcast = _INTERPRET and dtype == torch.bfloat16
    # input_precision only matters for fp32 operands; 16-bit dots keep triton's default.
    ieee = dtype == torch.float32 and (_INTERPRET or not torch.backends.cuda.matmul.allow_tf32)
    return upcast, ("ieee" if ieee else "tf32")


def _bshd_like(t: torch.Tensor) -> torch.Tensor:
    """An empty [B, H, S, D] tensor stored as [B, S, H, D] (the layout the processor consumes)."""
    b, h, s, d = t.shape
    return torch.empty((b, s, h, d), dtype=t.dtype, device=t.device).transpose(1, 2)


def _flash_fwd(q, k, v, scale):
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    o = _bshd_like(q)
    lse = torch.empty((b * h, n_q), dtype=torch.float32, device=q.device)
    upcast, precision = _flags(q.dtype)
    grid = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), b * h)  # noqa: E731
    _attn_fwd[grid](q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                    h, n_q, n_k, scale * _LOG2E,
                    HEAD_DIM=d, UPCAST=upcast, PRECISION=precision)
    return o, lse


def _flash_bwd(do, q, k, v, o, lse, scale, need_dq=True, need_dkdv=True):
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    upcast, precision = _flags(q.dtype)
    delta = torch.empty_like(lse)
    block = 128 if _INTERPRET else 64  # the interpreter pays per op, the GPU per register
    _bwd_delta[(triton.cdiv(n_q, block), b * h)](o, do, delta, *o.stride(), *do.stride(), h, n_q,
                                                   HEAD_DIM=d, BLOCK_M=block)
    dq = dk = dv = None
    if need_dkdv:
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        grid_kv = lambda meta: (triton.cdiv(n_k, meta["BLOCK_N"]), b * h)  # noqa: E731
        _attn_bwd_dkdv[grid_kv](q, k, v, do, lse, delta, dk, dv,
                                *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
                                h, n_q, n_k, scale * _LOG2E, scale,
                                HEAD_DIM=d, UPCAST=upcast, PRECISION=precision)
    if need_dq:
        dq = torch.empty_like(q)
        grid_q = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), b * h)  # noqa: E731
        _attn_bwd_dq[grid_q](q, k, v, do, lse, delta, dq,
                             *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
                             h, n_q, n_k, scale * _LOG2E, scale,
                             HEAD_DIM=d, UPCAST=upcast, PRECISION=precision)
    return dq, dk, dv


# The forward as one torch op, so that a dispatch mode sees it whole: selective activation checkpointing
# (i2v.model.checkpointing) keeps its outputs instead of launching the kernel again in backward.
@torch.library.custom_op("i2v::flash_attention_fwd", mutates_args=())
def _flash_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _flash_fwd(q, k, v, scale)


@_flash_fwd_op.register_fake
def _(q, k, v, scale):
    b, h, n_q, _ = q.shape
    return _bshd_like(q), q.new_empty((b * h, n_q), dtype=torch.float32)


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: saves Q, K, V, O and the base-2 logsumexp; the backward recomputes P."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        o, lse = _flash_fwd_op(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _flash_bwd(do, q, k, v, o, lse, ctx.scale, need_dq=ctx.needs_input_grad[0],
                                need_dkdv=ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        return dq, dk, dv, None


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Plain-PyTorch reference: softmax(q k^T * scale) v, computed in fp32 (fp64 stays fp64), input dtype out."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(s, dim=-1), v.to(compute)).to(q.dtype)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                    backend: str = "auto") -> torch.Tensor:
    """Non-causal attention on [B, H, S, D] tensors (any strides); differentiable.

    backend: "triton" forces the fused kernel, "torch" uses torch SDPA, "auto" follows the rule of
    `i2v.kernels.backends` (triton for CUDA tensors, SDPA otherwise). The triton output is a
    [B, H, S, D] view of [B, S, H, D] storage.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if resolve_backend(backend, q.device, "attention backend") == "torch":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if torch.is_autocast_enabled(q.device.type):
        # Same rule as SDPA under autocast: run in the autocast dtype (LayerNorm'd Q/K come out fp32).
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    _check_inputs(q, k, v)
    return FlashAttentionFunction.apply(q, k, v, scale)
