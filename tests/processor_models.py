"""A tiny CogVideoXTransformer3DModel with random weights and one batch, for the attention-processor tests
(tests/test_attention_processor.py, tests/test_qk_norm_rope.py), and one block's outputs and gradients
(tests/test_compile.py, tests/test_fp8.py)."""

import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed

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


def _assert_close(ref, ours, what):
    scale = ref.abs().max().item()
    err = (ref - ours).abs().max().item()
    assert err <= 1e-5 * max(scale, 1.0), f"{what}: max err {err:.3e} (scale {scale:.3e})"


def block_outputs_and_grads(block, fn, video, text, temb, rotary) -> list:
    """`fn` (the block, or a compiled form of it) on fresh leaf copies of the inputs, then a backward of the
    outputs' squares: [video out, text out, the three inputs' gradients, the block parameters' gradients]."""
    leaves = [t.clone().requires_grad_() for t in (video, text, temb)]
    block.zero_grad(set_to_none=True)
    out_video, out_text = fn(*leaves, rotary, None)
    (out_video.square().sum() + out_text.square().sum()).backward()
    return [out_video, out_text] + [t.grad for t in leaves] + [p.grad for p in block.parameters()]
