"""The fused QK LayerNorm + RoPE kernel (i2v/kernels/qk_norm_rope.py) against diffusers' maths (interpreter)."""

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb
from torch.utils._python_dispatch import TorchDispatchMode

from i2v.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_bwd, qk_norm_rope_fwd, qk_norm_rope_ref

# Odd lengths, text tokens first, several heads; D = 32 so every channel pair and the eps matter.
B, H, TEXT, VIDEO, D, EPS = 2, 3, 5, 29, 32, 1e-6


def _inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # A [B, S, H, D] projection viewed as [B, H, S, D], as the processor passes it, with an offset mean.
    x = (torch.randn(B, TEXT + VIDEO, H, D, generator=g) * 2 + 0.5).transpose(1, 2)
    weight = 1 + 0.3 * torch.randn(D, generator=g)
    bias = 0.2 * torch.randn(D, generator=g)
    angles = torch.randn(VIDEO, D, generator=g) * 3
    cos, sin = angles.cos(), angles.sin()
    grad = torch.randn(B, H, TEXT + VIDEO, D, generator=g)
    cast = lambda t: t.to(dtype).detach().requires_grad_()  # noqa: E731
    return cast(x), cast(weight), cast(bias), cos, sin, grad.to(dtype)


def _diffusers(x, weight, bias, cos, sin):
    """What CogVideoXAttnProcessor2_0 does to Q: attn.norm_q (nn.LayerNorm's forward is this F.layer_norm call,
    here on our weight and bias leaves), then apply_rotary_emb written into the video tokens."""
    y = torch.nn.functional.layer_norm(x, (D,), weight, bias, EPS)
    y[:, :, TEXT:] = apply_rotary_emb(y[:, :, TEXT:], (cos, sin))
    return y


def _grads(fn, x, weight, bias, cos, sin, grad):
    out = fn(x, weight, bias, cos, sin)
    return (out, *torch.autograd.grad(out, (x, weight, bias), grad))


def _ours(x, weight, bias, cos, sin):
    return qk_norm_rope(x, weight, bias, EPS, cos, sin, TEXT)


def _rel(a, ref):
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def test_fp32_outputs_and_gradients_match_diffusers():
    x, weight, bias, cos, sin, grad = _inputs()
    ours = _grads(_ours, x, weight, bias, cos, sin, grad)
    ref = _grads(_diffusers, x, weight, bias, cos, sin, grad)
    assert ours[0].shape == x.shape and ours[0].dtype == x.dtype
    # The layout flash_attention reads: [B, S, H, D] storage, and dx in the same layout.
    assert ours[0].transpose(1, 2).is_contiguous() and ours[1].transpose(1, 2).is_contiguous()
    for name, a, r in zip(("out", "dx", "dweight", "dbias"), ours, ref):
        assert _rel(a, r) <= 1e-5, f"{name}: relative error {_rel(a, r):.2e}"
    # The text rows are only normalised; the plain-PyTorch reference is the same maths.
    assert _rel(ours[0], qk_norm_rope_ref(x, weight, bias, EPS, cos, sin, TEXT)) <= 1e-5
    norm_only = torch.nn.functional.layer_norm(x[:, :, :TEXT], (D,), weight, bias, EPS)
    assert _rel(ours[0][:, :, :TEXT], norm_only) <= 1e-6


def test_bf16_error_at_most_twice_eager():
    x32, w32, b32, cos, sin, grad32 = _inputs(seed=1)
    x, w, b, _, _, grad = _inputs(torch.bfloat16, seed=1)
    # The fp32 reference sees exactly the bf16 inputs, upcast.
    ref = _grads(_diffusers, *(t.detach().float().requires_grad_() for t in (x, w, b)), cos, sin, grad.float())
    ours = _grads(_ours, x, w, b, cos, sin, grad)
    eager = _grads(_diffusers, x, w, b, cos, sin, grad)
    for name, o, e, r in zip(("out", "dx", "dweight", "dbias"), ours, eager, ref):
        assert o.dtype == torch.bfloat16
        assert _rel(o, r) <= 2 * _rel(e, r), f"{name}: ours {_rel(o, r):.2e} vs eager bf16 {_rel(e, r):.2e}"


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_processor_uses_the_fused_op_and_matches_diffusers():
    from processor_models import _assert_close, _forward_backward, _tiny_model

    from i2v.model.attention import apply_attention_backend

    model = _tiny_model()
    with _OpNames() as eager:
        ref_out, ref_grads = _forward_backward(model)
    apply_attention_backend(model, "triton")
    with _OpNames() as seen:
        out, grads = _forward_backward(model)
    # Two blocks, Q and K each: four fused forwards and four backwards; no eager layer norm or rotation left.
    assert seen.names.count("i2v.qk_norm_rope_fwd.default") == 4
    assert seen.names.count("i2v.qk_norm_rope_bwd.default") == 4
    # The QK LayerNorms (Q and K, 2 blocks) are gone; the model's other LayerNorms remain.
    layer_norms = [n.names.count("aten.native_layer_norm.default") for n in (eager, seen)]
    assert layer_norms[0] - layer_norms[1] == 4
    _assert_close(ref_out, out, "output")
    assert ref_grads.keys() == grads.keys()
    for name in ref_grads:
        _assert_close(ref_grads[name], grads[name], f"grad of {name}")


def test_ops_pass_opcheck():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 7, 2, 16, generator=g).transpose(1, 2).requires_grad_()
    weight = torch.randn(16, generator=g).requires_grad_()
    bias = torch.randn(16, generator=g).requires_grad_()
    angles = torch.randn(4, 16, generator=g)
    cos, sin = angles.cos(), angles.sin()
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static",
             "test_aot_dispatch_dynamic")
    torch.library.opcheck(qk_norm_rope_fwd, (x, weight, bias, 1e-5, cos, sin, 3), test_utils=tests)
    out, mean, rstd = qk_norm_rope_fwd(x.detach(), weight.detach(), bias.detach(), 1e-5, cos, sin, 3)
    grad = torch.randn(out.shape, generator=g)
    torch.library.opcheck(qk_norm_rope_bwd, (grad, x.detach(), weight.detach(), mean, rstd, cos, sin, 3),
                          test_utils=tests[:1] + tests[2:])


def test_meta_device_runs_the_fakes():
    x = torch.empty(2, 226 + 1755, 48, 64, device="meta", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    weight = torch.empty(64, device="meta", requires_grad=True)
    bias = torch.empty(64, device="meta", requires_grad=True)
    cos = sin = torch.empty(1755, 64, device="meta")
    out = qk_norm_rope(x, weight, bias, 1e-6, cos, sin, 226)
    assert out.device.type == "meta" and out.dtype == torch.bfloat16 and out.shape == x.shape
    assert out.stride() == x.stride()  # [B, S, H, D] storage
    out.backward(torch.empty_like(out))
    assert x.grad.shape == x.shape and x.grad.dtype == torch.bfloat16
    assert weight.grad.shape == (64,) and weight.grad.dtype == torch.float32 and bias.grad.shape == (64,)


def test_bad_inputs_raise():
    x, weight, bias, cos, sin, _ = _inputs()
    with pytest.raises(ValueError, match="cos/sin"):
        qk_norm_rope(x, weight, bias, EPS, cos[1:], sin[1:], TEXT)
    with pytest.raises(ValueError, match="weight and bias"):
        qk_norm_rope(x, weight[:8], bias, EPS, cos, sin, TEXT)
    with pytest.raises(ValueError, match="head dim"):
        qk_norm_rope(x[..., :24], weight[:24], bias[:24], EPS, cos[:, :24], sin[:, :24], TEXT)


@pytest.mark.parametrize("text_len", [0, TEXT])
def test_backward_row_loop_and_partial_sums(monkeypatch, text_len):
    # One program looping over every row tile gives the gradients of one program per tile.
    from i2v.kernels import qk_norm_rope as mod

    x, weight, bias, cos, sin, grad = _inputs(seed=3)
    cos, sin = (torch.cat([t[:1].expand(TEXT - text_len, D), t]) for t in (cos, sin))
    fn = lambda *a: qk_norm_rope(a[0], a[1], a[2], EPS, a[3], a[4], text_len)  # noqa: E731
    many = _grads(fn, x, weight, bias, cos, sin, grad)
    monkeypatch.setattr(mod, "_MAX_PROGRAMS", 1)
    one = _grads(fn, x, weight, bias, cos, sin, grad)
    ref = _grads(lambda *a: qk_norm_rope_ref(a[0], a[1], a[2], EPS, a[3], a[4], text_len), x, weight, bias, cos, sin,
                 grad)
    for name, a, b, r in zip(("out", "dx", "dweight", "dbias"), many, one, ref):
        assert torch.equal(a, b) if name in ("out", "dx") else _rel(a, b) <= 1e-6, name
        assert _rel(b, r) <= 1e-5, f"{name}: {_rel(b, r):.2e}"
