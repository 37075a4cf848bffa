"""CogVideoXFlashAttnProcessor on a tiny CogVideoXTransformer3DModel equals diffusers' default processor."""

import copy

import pytest
import torch
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0

from i2v.model.attention import CogVideoXFlashAttnProcessor, apply_attention_backend
from processor_models import _assert_close, _batch, _forward_backward, _tiny_model

def _processors(model):
    return list(model.attn_processors.values())


def test_triton_processor_matches_diffusers_forward_and_backward():
    model = _tiny_model()
    assert all(isinstance(p, CogVideoXAttnProcessor2_0) for p in _processors(model))
    ref_out, ref_grads = _forward_backward(model)

    assert apply_attention_backend(model, "triton") == "triton"
    assert all(isinstance(p, CogVideoXFlashAttnProcessor) and p.backend == "triton" for p in _processors(model))
    out, grads = _forward_backward(model)

    _assert_close(ref_out, out, "output")
    assert ref_grads.keys() == grads.keys()
    # Every attention projection and the QK norms must receive gradient through the kernel.
    assert any("norm_q" in n for n in grads) and any("to_q" in n for n in grads)
    for name in ref_grads:
        _assert_close(ref_grads[name], grads[name], f"grad of {name}")


def test_fused_qkv_projections_match():
    model = _tiny_model()
    model.fuse_qkv_projections()
    assert all(isinstance(p, FusedCogVideoXAttnProcessor2_0) for p in _processors(model))
    x, text, rope, _ = _batch()
    with torch.no_grad():
        ref = model(x, text, torch.tensor([10]), image_rotary_emb=rope, return_dict=False)[0]
        apply_attention_backend(model, "triton")
        ours = model(x, text, torch.tensor([10]), image_rotary_emb=rope, return_dict=False)[0]
    _assert_close(ref, ours, "fused-qkv output")
    # Going back to SDPA restores the fused diffusers processor, not the unfused one.
    assert apply_attention_backend(model, "torch") == "torch"
    assert all(isinstance(p, FusedCogVideoXAttnProcessor2_0) for p in _processors(model))


def test_auto_on_cpu_keeps_diffusers_default_and_torch_restores_it():
    model = _tiny_model()
    default = _processors(model)
    assert apply_attention_backend(model, "auto") == "torch"
    assert _processors(model) == default  # untouched: the very same processor objects

    apply_attention_backend(model, "triton")
    assert apply_attention_backend(model, "auto") == "torch"
    assert all(type(p) is CogVideoXAttnProcessor2_0 for p in _processors(model))


def test_auto_for_a_model_headed_to_cuda_installs_triton():
    # Built on the CPU, trained on the GPU: the caller names the device the model will run on.
    model = _tiny_model()
    assert apply_attention_backend(model, "auto", device="cuda") == "triton"
    assert all(isinstance(p, CogVideoXFlashAttnProcessor) for p in _processors(model))


def test_torch_processor_backend_matches_diffusers():
    model = _tiny_model()
    x, text, rope, _ = _batch()
    other = copy.deepcopy(model)
    other.set_attn_processor(CogVideoXFlashAttnProcessor("torch"))
    with torch.no_grad():
        ref = model(x, text, torch.tensor([3]), image_rotary_emb=rope, return_dict=False)[0]
        ours = other(x, text, torch.tensor([3]), image_rotary_emb=rope, return_dict=False)[0]
    assert torch.equal(ref, ours)


def test_bad_backend_names_raise():
    model = _tiny_model()
    with pytest.raises(ValueError, match="kernels.attention"):
        apply_attention_backend(model, "flash")
    with pytest.raises(ValueError, match="backend"):
        CogVideoXFlashAttnProcessor("auto")
