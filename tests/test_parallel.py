"""i2v/model/parallel.py in one process: the SP forward at SP 1 is diffusers' forward; the token split; config errors.

The multi-rank maths (all-to-all, head gather, ZeRO gradient scales) is tested through the trainer
in tests/test_sequence_parallel.py.
"""

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel

from conftest import REPO
from i2v.core import diffusion
from i2v.config import load_config, resolve
from i2v.core.errors import ConfigError
from i2v.model.transformer import predict, rotary_embeddings
from i2v.config.schema import check_sequence_parallel
from i2v.model.parallel import Layout, VideoShard, enable_sharded_forward, patchify, sharded_loss

TINY = REPO / "configs" / "tiny.yaml"
BASE = dict(num_attention_heads=2, attention_head_dim=16, in_channels=8, out_channels=4, time_embed_dim=16,
            text_embed_dim=24, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
            max_text_seq_length=7, use_rotary_positional_embeddings=True)
VARIANTS = {
    "1.0 RoPE": {},
    "1.0 sincos positions (2B)": dict(use_rotary_positional_embeddings=False),
    "1.0 RoPE + learned positions (5B-I2V)": dict(use_learned_positional_embeddings=True),
    "1.5 temporal patches + ofs": dict(patch_size_t=2, ofs_embed_dim=16, sample_frames=13),
}


def _model(arch):
    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(**{**BASE, **arch})
    with torch.no_grad():  # every weight random, the output layer included, so every path matters
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def _inputs(model, height=8, width=8):
    gen = torch.Generator().manual_seed(1)
    frames = 4 if model.config.patch_size_t else 3
    return {"model_input": torch.randn(2, frames, 8, height, width, generator=gen),
            "target": torch.randn(2, frames, 4, height, width, generator=gen),
            "prompt": torch.randn(2, 7, 24, generator=gen), "t": torch.tensor([10, 700])}


def _loss_and_grads(model, fn):
    model.zero_grad()
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", VARIANTS.values(), ids=VARIANTS.keys())
def test_sharded_forward_at_sp1_equals_diffusers_forward_and_its_loss_and_gradients(arch):
    model = _model(arch)
    # A width other than the sample width where the model allows it (1.0 without learned positions).
    other = not (arch.get("use_learned_positional_embeddings") or arch.get("patch_size_t"))
    x = _inputs(model, width=12 if other else 8)
    _, frames, _, h, w = x["model_input"].shape
    rope = rotary_embeddings(model.config, frames, h, w, "cpu") if model.config.use_rotary_positional_embeddings else None
    ofs = 2.0 if model.config.ofs_embed_dim else None
    ref = predict(model, x["model_input"], x["prompt"], x["t"], ofs, rope)
    ref_loss, ref_grads = _loss_and_grads(
        model, lambda: diffusion.loss_v_mse(predict(model, x["model_input"], x["prompt"], x["t"], ofs, rope), x["target"]))

    enable_sharded_forward(model)
    pt = model.config.patch_size_t or 1
    tokens = patchify(ref, 2, pt).shape[1]
    out = predict(model, x["model_input"], x["prompt"], x["t"], ofs, rope, video_shard=VideoShard(None, 1, 0, tokens))
    assert torch.equal(out, patchify(ref, 2, pt))
    loss, grads = _loss_and_grads(model, lambda: sharded_loss(model, x, ofs, rope, Layout(0, 1, 1)))
    assert torch.allclose(loss, ref_loss, rtol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        assert torch.allclose(grads[name], g, rtol=1e-5, atol=1e-7), name
    # Calls without a shard still run diffusers' forward.
    assert torch.equal(predict(model, x["model_input"], x["prompt"], x["t"], ofs, rope), ref)


def test_token_split_pads_the_last_runs():
    shards = [VideoShard(None, 2, r, 27) for r in range(2)]
    assert [(s.start, s.stop, s.per_rank) for s in shards] == [(0, 14, 14), (14, 27, 14)]
    assert shards[1].pad(torch.ones(1, 13, 3)).shape == (1, 14, 3)
    assert shards[1].pad(torch.ones(1, 13, 3))[0, 13].eq(0).all()
    # Fewer tokens than runs leave a rank with padding only; it still takes part in every collective.
    assert [(s.start, s.stop) for s in (VideoShard(None, 4, r, 3) for r in range(4))] == [(0, 1), (1, 2), (2, 3), (3, 3)]


def test_layout_keys_data_by_the_dp_rank():
    layouts = [Layout(rank, 4, 2) for rank in range(4)]
    assert [(x.dp_rank, x.sp_rank) for x in layouts] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert layouts[0].dp_size == 2 and layouts[0].describe() == "2 DP x 2 SP"


def test_sequence_parallel_size_must_divide_world_and_heads():
    with pytest.raises(ConfigError, match=r"parallel.sequence_parallel_size: is 2, which does not divide the world size 3"):
        resolve(load_config(TINY, ["parallel.sequence_parallel_size=2"]), 3)
    with pytest.raises(ConfigError, match=r"is 4, which does not divide the model's 2 attention heads"):
        check_sequence_parallel(4, 4, heads=2)
    with pytest.raises(ConfigError, match=r"parallel.sequence_parallel_size: is 0, expected a value >= 1"):
        load_config(TINY, ["parallel.sequence_parallel_size=0"])
    # The global batch counts data-parallel replicas: 2 micro-batches of 4 per step on 4 ranks at SP 2.
    sp2 = ["parallel.sequence_parallel_size=2", "train.micro_batch_size=4"]
    assert resolve(load_config(TINY, [*sp2, "train.global_batch_size=16"]), 4).grad_accum_steps == 2
    with pytest.raises(ConfigError, match=r"data-parallel size \(world 4 / sequence parallel 2\) \(2\) = 8"):
        resolve(load_config(TINY, [*sp2, "train.global_batch_size=16", "train.grad_accum_steps=1"]), 4)


def test_zero3_reduce_scatter_must_stay_on_under_sp():
    with pytest.raises(ConfigError, match=r"deepspeed.extra.zero_optimization.reduce_scatter: must stay true"):
        load_config(TINY, ["parallel.sequence_parallel_size=2", "deepspeed.zero_stage=3",
                           "deepspeed.extra={zero_optimization: {reduce_scatter: false}}"])
    load_config(TINY, ["deepspeed.zero_stage=3", "deepspeed.extra={zero_optimization: {reduce_scatter: false}}"])
