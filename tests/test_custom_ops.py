"""The Triton kernels as torch.library custom ops: opcheck on small CPU inputs (interpreter), fakes on meta.

opcheck runs each op for real several times (schema, fake-vs-real, autograd registration, AOT dispatch
static and dynamic); under the interpreter that stays small at these shapes (about 15 s for the file).
"""

import pytest
import torch

from i2v.kernels import attention, noise
from i2v.kernels.attention import flash_attention, flash_attention_bwd, flash_attention_fwd

# All five of opcheck's utilities: schema, autograd registration, fake vs real, AOT dispatch static and dynamic.
_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static",
          "test_aot_dispatch_dynamic")


def _qkv(requires_grad):
    g = torch.Generator().manual_seed(0)
    # Sq != Sk, and a [B, S, H, D] projection viewed as [B, H, S, D], as the processor passes it.
    q = torch.randn(1, 19, 2, 16, generator=g).transpose(1, 2)
    k = torch.randn(1, 2, 23, 16, generator=g)
    v = torch.randn(1, 2, 23, 16, generator=g)
    return [t.detach().requires_grad_(requires_grad) for t in (q, k, v)]


def test_flash_attention_ops_pass_opcheck():
    q, k, v = _qkv(requires_grad=True)
    torch.library.opcheck(flash_attention_fwd, (q, k, v, 0.25), test_utils=_TESTS)
    q, k, v = _qkv(requires_grad=False)
    o, lse = flash_attention_fwd(q, k, v, 0.25)
    do = torch.randn_like(o)
    for need_dq, need_dkdv in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(flash_attention_bwd, (do, q, k, v, o, lse, 0.25, need_dq, need_dkdv), test_utils=_TESTS)


def test_flash_attention_op_gradients_match_the_reference():
    q, k, v = _qkv(requires_grad=True)
    out = flash_attention(q, k, v, backend="triton")
    dq, dk, dv = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = attention.attention_ref(q.double(), k.double(), v.double())
    rq, rk, rv = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for got, want in ((out, ref), (dq, rq), (dk, rk), (dv, rv)):
        torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=1e-4)


def test_only_the_gradients_asked_for_are_computed():
    q, k, v = _qkv(requires_grad=False)
    k.requires_grad_(True)  # dK and dV come from one launch; dQ is not asked for
    out = flash_attention(q, k, v, backend="triton")
    (dk,) = torch.autograd.grad(out.sum(), (k,))
    assert dk.shape == k.shape
    o, lse = flash_attention_fwd(q, k, v, 0.25)
    dq, dk, dv = flash_attention_bwd(torch.ones_like(o), q, k, v, o, lse, 0.25, False, True)
    assert dq.numel() == 0 and dk.shape == k.shape and dv.shape == v.shape


def test_attention_fakes_give_shapes_strides_and_the_logsumexp_on_meta():
    b, h, s, d = 1, 48, 17_776, 64
    q = torch.empty(b, s, h, d, dtype=torch.bfloat16, device="meta").transpose(1, 2).requires_grad_(True)
    k = torch.empty(b, h, s, d, dtype=torch.bfloat16, device="meta", requires_grad=True)
    v = torch.empty_like(k, requires_grad=True)
    o, lse = flash_attention_fwd(q, k, v, d ** -0.5)
    assert o.device.type == "meta" and o.shape == (b, h, s, d) and o.dtype == torch.bfloat16
    assert o.stride() == (s * h * d, d, h * d, 1)  # [B, S, H, D] storage, as the kernel writes it
    assert lse.shape == (b * h, s) and lse.dtype == torch.float32 and not lse.requires_grad
    dq, dk, dv = torch.autograd.grad(flash_attention(q, k, v, backend="triton").sum(), (q, k, v))
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape and dq.device.type == "meta"


@pytest.mark.parametrize("return_noise", [False, True])
def test_noise_ops_pass_opcheck_and_keep_the_key(return_noise):
    g = torch.Generator().manual_seed(1)
    x0, img = torch.randn(2, 3, 4, 5, 7, generator=g), torch.randn(2, 1, 4, 5, 7, generator=g)
    a, s = torch.tensor([0.8, 0.6]), torch.tensor([0.6, 0.8])
    big = 2**64 - 5  # a key above 2**63 travels as its signed image and comes back the same
    args = (x0, img, a, s, noise._signed64(big), noise._signed64(2**63 + 9), True, return_noise)
    torch.library.opcheck(noise.inject_noise_op, args, test_utils=_TESTS)
    direct = noise._launch_inject(x0, img, a, s, big, 2**63 + 9, "v", return_noise)
    via_op = noise.inject_noise(x0, img, a, s, seed=big, offset=2**63 + 9, backend="triton", return_noise=return_noise)
    assert all(torch.equal(x, y) for x, y in zip(via_op, direct[: len(via_op)]))
    frames = torch.rand(2, 3, 6, 6, generator=g) * 2 - 1
    torch.library.opcheck(noise.condition_noise_op, (frames, a, 5, -3, return_noise), test_utils=_TESTS)


def test_noise_fakes_on_meta():
    x0 = torch.empty(1, 13, 16, 60, 90, dtype=torch.bfloat16, device="meta")
    img = torch.empty(1, 1, 16, 60, 90, dtype=torch.bfloat16, device="meta")
    coef = torch.empty(1, device="meta")
    model_input, target, eps = noise.inject_noise(x0, img, coef, coef, seed=0, backend="triton", return_noise=True)
    assert model_input.shape == (1, 13, 32, 60, 90) and target.shape == eps.shape == x0.shape
    assert model_input.dtype == target.dtype == torch.bfloat16 and model_input.device.type == "meta"
    out = noise.condition_noise(torch.empty(2, 3, 8, 8, device="meta"), torch.empty(2, device="meta"), seed=1,
                                backend="triton")
    assert out.shape == (2, 3, 8, 8) and out.device.type == "meta"
