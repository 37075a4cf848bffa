"""Fused flash attention kernel (interpreter on CPU) against an fp64 reference.

Tolerance, per output and gradient: err(ours) <= 2 * err(torch SDPA at the same dtype) + 1e-5,
both measured as max abs error against the fp64 reference.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from i2v.kernels.attention import attention_ref, flash_attention

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32


def _inputs(shape_q, shape_kv=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape_kv = shape_kv or shape_q
    q = torch.randn(shape_q, generator=gen, dtype=torch.float64)
    k = torch.randn(shape_kv, generator=gen, dtype=torch.float64)
    v = torch.randn(shape_kv, generator=gen, dtype=torch.float64)
    do = torch.randn(shape_q, generator=gen, dtype=torch.float64)
    return q, k, v, do


def _run(fn, q, k, v, do, dtype):
    """(O, dQ, dK, dV) of fn at `dtype`, returned in fp64."""
    leaves = [t.to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
    o = fn(*leaves)
    o.backward(do.to(dtype))
    return [t.detach().double() for t in (o, *(x.grad for x in leaves))]


def _max_err(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize(
    "seq, head_dim, dtype",
    [
        (1, 64, FP16),
        (17, 128, FP32),
        (77, 64, BF16),
        (130, 128, FP16),
        (333, 64, FP32),
        (333, 128, BF16),
    ],
)
def test_matches_fp64_reference_within_sdpa_error(seq, head_dim, dtype):
    q, k, v, do = _inputs((1, 2, seq, head_dim), seed=seq + head_dim)
    ref = _run(attention_ref, q, k, v, do, torch.float64)
    ours = _run(lambda a, b, c: flash_attention(a, b, c, backend="triton"), q, k, v, do, dtype)
    sdpa = _run(F.scaled_dot_product_attention, q, k, v, do, dtype)
    for name, x, y, r in zip(("O", "dQ", "dK", "dV"), ours, sdpa, ref):
        err, bound = _max_err(x, r), 2 * _max_err(y, r) + 1e-5
        assert err <= bound, f"{name}: max err {err:.3e} > {bound:.3e} (seq={seq}, d={head_dim}, {dtype})"


def test_reference_is_softmax_attention():
    q, k, v, _ = _inputs((1, 2, 9, 16))
    expected = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    assert torch.allclose(attention_ref(q, k, v, scale=0.3), expected, atol=1e-12, rtol=0)


def test_cross_lengths_and_custom_scale():
    q, k, v, do = _inputs((1, 1, 45, 32), (1, 1, 150, 32), seed=3)
    scale = 0.05
    ref = _run(lambda a, b, c: attention_ref(a, b, c, scale), q, k, v, do, torch.float64)
    ours = _run(lambda a, b, c: flash_attention(a, b, c, scale=scale, backend="triton"), q, k, v, do, FP32)
    for name, x, r in zip(("O", "dQ", "dK", "dV"), ours, ref):
        assert _max_err(x, r) < 1e-5, name


def test_strided_inputs_give_identical_results():
    b, h, s, d = 1, 2, 70, 64
    q, k, v, do = _inputs((b, h, s, d), seed=7)
    q, k, v, do = (t.float() for t in (q, k, v, do))

    # Three different non-contiguous layouts of the same values, and a strided upstream gradient.
    q_s = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, S, H, D] storage
    k_s = torch.cat([k, torch.randn_like(k)], dim=-1)[..., :d]  # row stride 2D
    v_s = v.transpose(-1, -2).contiguous().transpose(-1, -2)  # head-dim stride S
    do_s = do.transpose(1, 2).contiguous().transpose(1, 2)
    assert not any(t.is_contiguous() for t in (q_s, k_s, v_s, do_s))

    dense = _run(lambda a, c, e: flash_attention(a, c, e, backend="triton"), q, k, v, do, FP32)
    leaves = [t.clone().requires_grad_() for t in (q_s, k_s, v_s)]
    o = flash_attention(*leaves, backend="triton")
    o.backward(do_s)
    strided = [o.detach(), *(x.grad for x in leaves)]
    for name, x, y in zip(("O", "dQ", "dK", "dV"), dense, strided):
        assert torch.equal(x.float(), y), name


def test_broadcast_upstream_gradient():
    # o.sum() hands the backward an expanded dO whose strides are all zero.
    q, k, v, _ = _inputs((1, 1, 40, 16), seed=11)
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    flash_attention(*leaves, backend="triton").sum().backward()
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    attention_ref(*ref).sum().backward()
    for x, r in zip(leaves, ref):
        assert _max_err(x.grad.double(), r.grad) < 1e-5


def test_output_is_bshd_storage():
    q, k, v, _ = (t.float() for t in _inputs((1, 2, 20, 16)))
    o = flash_attention(q, k, v, backend="triton")
    assert o.shape == (1, 2, 20, 16) and o.transpose(1, 2).is_contiguous()


def test_torch_and_auto_backends_on_cpu_are_torch_sdpa():
    q, k, v, _ = (t.float() for t in _inputs((1, 2, 20, 16)))
    expected = F.scaled_dot_product_attention(q, k, v)
    for backend in ("torch", "auto"):
        assert torch.equal(flash_attention(q, k, v, backend=backend), expected), backend
    expected = F.scaled_dot_product_attention(q, k, v, scale=1 / math.pi)
    assert torch.equal(flash_attention(q, k, v, scale=1 / math.pi, backend="torch"), expected)
    with pytest.raises(ValueError, match="'auto', 'triton', 'torch', got 'sdpa'"):  # the old name is gone
        flash_attention(q, k, v, backend="sdpa")


@pytest.mark.parametrize(
    "shapes, dtypes, message",
    [
        (((1, 1, 8, 48),) * 3, (FP32,) * 3, "head dim"),
        (((1, 1, 8, 16),) * 3, (FP32, FP16, FP32), "dtype"),
        (((1, 8, 16), (1, 1, 8, 16), (1, 1, 8, 16)), (FP32,) * 3, r"\[B, H, S, D\]"),
        (((1, 2, 8, 16), (1, 1, 8, 16), (1, 1, 8, 16)), (FP32,) * 3, "expected q"),
        (((1, 1, 0, 16),) * 3, (FP32,) * 3, ">= 1"),
    ],
)
def test_bad_inputs_raise(shapes, dtypes, message):
    q, k, v = (torch.randn(s).to(dt) for s, dt in zip(shapes, dtypes))
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, v, backend="triton")


def test_unknown_backend_raises():
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="backend"):
        flash_attention(q, q, q, backend="flash")


def test_autocast_runs_in_autocast_dtype_like_sdpa():
    # Under autocast, LayerNorm'd Q/K arrive in fp32 next to a bf16 V; SDPA runs them in bf16.
    q, k, v, _ = (t.float() for t in _inputs((1, 1, 33, 16), seed=5))
    with torch.autocast("cpu", dtype=BF16):
        ours = flash_attention(q, k, v.to(BF16), backend="triton")
        sdpa = F.scaled_dot_product_attention(q, k, v.to(BF16))
    assert ours.dtype == sdpa.dtype == BF16
    ref = attention_ref(*(t.double() for t in (q, k, v)))
    assert _max_err(ours.double(), ref) <= 2 * _max_err(sdpa.double(), ref) + 1e-5


def test_gradient_for_query_only():
    q, k, v, do = (t.float() for t in _inputs((1, 1, 50, 32), seed=9))
    q_ours, q_ref = q.clone().requires_grad_(), q.clone().requires_grad_()
    flash_attention(q_ours, k, v, backend="triton").backward(do)
    attention_ref(q_ref, k, v).backward(do)
    assert _max_err(q_ours.grad.double(), q_ref.grad.double()) < 1e-5
