"""The cost model against the reference figures and against torch's own FLOP counter."""

import json

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import REPO
from i2v.model.flops import default_peak_tflops, training_flops
from i2v.model.transformer import rotary_embeddings
from runs import MID, tiny_arch


# The same in 1.5 style: frames patched in pairs (a Linear patch embedding), the ofs embedding
# (as wide as the timestep embedding, which it is added to).
MID_15 = dict(MID, patch_size_t=2, ofs_embed_dim=128, patch_bias=False, sample_height=24, sample_width=24)


def counted_flops(arch: dict, frames: int, height: int, width: int, batch: int, checkpointing: bool) -> int:
    """What FlopCounterMode sees for one training forward + backward (math SDPA, which it can count)."""
    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(**arch)
    if checkpointing:
        model.enable_gradient_checkpointing()
    c = model.config
    x = torch.randn(batch, frames, c.in_channels, height, width)
    text = torch.randn(batch, c.max_text_seq_length, c.text_embed_dim)
    extra = {"ofs": torch.full((batch,), 2.0)} if c.ofs_embed_dim else {}
    rotary = rotary_embeddings(c, frames, height, width, "cpu")
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(hidden_states=x, encoder_hidden_states=text, timestep=torch.randint(0, 1000, (batch,)),
                    image_rotary_emb=rotary, return_dict=False, **extra)[0]
        out.square().mean().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("arch,shape,batch,checkpointing", [
    ("tiny", (3, 8, 8), 2, False),
    ("tiny", (3, 8, 8), 1, True),
    ("mid", (13, 8, 12), 1, False),
    ("mid", (5, 16, 24), 1, True),
    ("mid_15", (6, 12, 16), 1, True),
], ids=["tiny", "tiny-checkpointed", "mid-13x8x12", "mid-5x16x24-checkpointed", "mid-1.5-style"])
def test_training_flops_match_torch_flop_counter(arch, shape, batch, checkpointing):
    arch = {"tiny": tiny_arch(), "mid": MID, "mid_15": MID_15}[arch]
    config = CogVideoXTransformer3DModel(**arch).config
    est = training_flops(config, *shape, gradient_checkpointing=checkpointing)
    # With checkpointing the counter also sees the blocks' recompute: that is the hardware figure.
    want = (est.hardware if checkpointing else est.model) * batch
    got = counted_flops(arch, *shape, batch, checkpointing)
    assert abs(want - got) <= 0.03 * got, f"estimate {want:,} vs counted {got:,}"
    assert (est.recompute > 0) == checkpointing


def test_cogvideox_5b_i2v_reference_figures():
    with open(REPO / "configs" / "arch" / "cogvideox-5b-i2v.json") as f:
        arch = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    with torch.device("meta"):
        model = CogVideoXTransformer3DModel(**arch)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 5_570_479_680
    f = training_flops(model.config, 13, 60, 90)  # 49 x 480 x 720 clips
    assert (f.text_tokens, f.video_tokens, f.tokens) == (226, 17_550, 17_776)
    assert f.model == pytest.approx(0.997e15, rel=1e-3)
    # The textbook form: 6·N·S for the per-token linear weights plus 12·L·S²·d for attention.
    d, layers, s = 48 * 64, 42, 17_776
    per_token_weights = layers * 12 * d * d
    assert f.model == pytest.approx(6 * per_token_weights * s + 12 * layers * s * s * d, rel=2e-3)
    checkpointed = training_flops(model.config, 13, 60, 90, gradient_checkpointing=True)
    assert checkpointed.model == f.model
    assert checkpointed.hardware == pytest.approx(f.model * 4 / 3, rel=1e-2)  # one more forward of the blocks


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA H100 PCIe", None), ("NVIDIA H100 NVL", None),
    ("NVIDIA H200 NVL", None), ("NVIDIA GeForce RTX 4090", None),
])
def test_default_peak_by_device_name_knows_only_the_table(name, peak):
    assert default_peak_tflops(name) == peak


def test_peak_tflops_must_be_positive():
    from i2v.config import load_config
    from i2v.core.errors import ConfigError

    with pytest.raises(ConfigError, match="train.peak_tflops"):
        load_config(REPO / "configs" / "tiny.yaml", ["train.peak_tflops=0"])
    assert load_config(REPO / "configs" / "tiny.yaml", ["train.peak_tflops=989"]).train.peak_tflops == 989.0
