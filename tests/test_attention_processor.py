"""CogVideoXFlashAttnProcessor on a tiny CogVideoXTransformer3DModel equals diffusers' default processor."""

import copy

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0
from diffusers.models.embeddings import get_3d_rotary_pos_embed

from i2v.model.attention import CogVideoXFlashAttnProcessor, apply_attention_backend

HEADS, HEAD_DIM, FRAMES, HEIGHT, WIDTH, TEXT = 2, 16, 2, 8, 12, 7


def _tiny_model():
    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=8,
        out_channels=4,
        time_embed_dim=16,
        text_embed_dim=24,
        num_layers=2,
        sample_width=WIDTH,
        sample_height=HEIGHT,
        sample_frames=(FRAMES - 1) * 4 + 1,
        patch_size=2,
        max_text_seq_length=TEXT,
        use_rotary_positional_embeddings=True,
    )
    # Default init zeroes some projections; random weights make every path matter.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def _batch():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, FRAMES, 8, HEIGHT, WIDTH, generator=gen)
    text = torch.randn(1, TEXT, 24, generator=gen)
    rope = get_3d_rotary_pos_embed(
        embed_dim=HEAD_DIM,
        crops_coords=((0, 0), (HEIGHT // 2, WIDTH // 2)),
        grid_size=(HEIGHT // 2, WIDTH // 2),
        temporal_size=FRAMES,
    )
    target = torch.randn(1, FRAMES, 4, HEIGHT, WIDTH, generator=gen)
    return x, text, rope, target


def _forward_backward(model):
    x, text, rope, target = _batch()
    out = model(x, text, torch.tensor([500]), image_rotary_emb=rope, return_dict=False)[0]
    loss = ((out - target) ** 2).mean()
    model.zero_grad()
    loss.backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _processors(model):
    return list(model.attn_processors.values())


def _assert_close(ref, ours, what):
    scale = ref.abs().max().item()
    err = (ref - ours).abs().max().item()
    assert err <= 1e-5 * max(scale, 1.0), f"{what}: max err {err:.3e} (scale {scale:.3e})"


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
