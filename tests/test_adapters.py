"""model.lora on the real diffusers transformer: what trains, config errors, meta-device counts, and
the LoRA file's keys and scaling against diffusers' own writer and loader."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import CogVideoXImageToVideoPipeline, CogVideoXTransformer3DModel

from conftest import REPO

from i2v.model.adapters import diffusers_lora_state_dict, trainable_names, trainable_parameters, with_lora
from i2v.config import load_config
from i2v.core.errors import ConfigError
from i2v.model.transformer import build_transformer, rotary_embeddings

TINY = str(REPO / "configs" / "tiny.yaml")
LORA = ["run.output_dir=/tmp/unused", "model.lora.rank=4", "model.lora.alpha=8", "model.lora.extra_trainable=[proj_out]"]

# CogVideoX-5b-I2V's transformer/config.json (the published architecture).
ARCH_5B = dict(num_attention_heads=48, attention_head_dim=64, in_channels=32, out_channels=16, time_embed_dim=512,
               text_embed_dim=4096, num_layers=42, sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
               max_text_seq_length=226, use_rotary_positional_embeddings=True,
               use_learned_positional_embeddings=True)


def _lora_model(*over, seed=0):
    cfg = load_config(TINY, LORA + list(over))
    return cfg, with_lora(build_transformer(cfg.model, seed=cfg.run.seed), cfg.model, seed=seed)


def _forward(model):
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 3, 8, 8, 8, generator=g), torch.randn(1, 32, 32, generator=g)
    rotary = rotary_embeddings(model.config, 3, 8, 8, "cpu")
    with torch.no_grad():
        return model(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([500]),
                     image_rotary_emb=rotary, return_dict=False)[0]


def test_lora_trains_adapters_and_extra_modules_and_starts_as_the_base():
    cfg, model = _lora_model("model.init_std=0.2")
    names = trainable_names(model)
    # A and B of to_q, to_k, to_v and to_out.0 in every block, and the unfrozen proj_out.
    expected = 8 * model.config.num_layers + 2
    assert len(names) == expected and [n for n in names if "lora_" not in n] == ["proj_out.weight", "proj_out.bias"]
    assert all(".attn1.to_" in n for n in names if "lora_" in n)
    assert len(trainable_parameters(model)) == expected
    frozen = [p for n, p in model.named_parameters() if n not in names]
    assert frozen and all(p.dtype == torch.float32 for p in model.parameters())
    base = build_transformer(cfg.model, seed=0)
    with torch.no_grad():  # a non-zero output layer, so the comparison sees the attention branch
        for m in (base, model):
            m.proj_out.weight.copy_(torch.linspace(-1, 1, m.proj_out.weight.numel()).view_as(m.proj_out.weight))
    torch.testing.assert_close(_forward(model), _forward(base), rtol=0, atol=0)  # zero B: a no-op at init
    _, again = _lora_model("model.init_std=0.2")
    _, other = _lora_model("model.init_std=0.2", seed=1)
    key = "transformer_blocks.0.attn1.to_q.lora_A.default.weight"
    a, b, c = (dict(m.named_parameters())[key] for m in (model, again, other))
    assert torch.equal(a, b) and not torch.equal(a, c)  # the adapters' init is seeded


@pytest.mark.parametrize("over,error", [
    (["model.lora.target_modules=[to_qq]"],
     r"model\.lora\.target_modules: 'to_qq' matches no module of the transformer; closest names: to_q"),
    (["model.lora.rank=65"], r"model\.lora\.rank: is 65, larger than the width of transformer_blocks\.0\.attn1\.to_q "
                             r"\(Linear 64 -> 64\); at most 64 there"),
    (["model.lora.target_modules=[norm1]"], r"'norm1' matches transformer_blocks\.0\.norm1, a CogVideoXLayerNormZero"),
    (["model.lora.extra_trainable=[proj_out, patch_embd.proj]"],
     r"model\.lora\.extra_trainable: 'patch_embd\.proj' matches no module of the transformer; closest names: "
     r"patch_embed\.proj"),
    (["model.lora.extra_trainable=[patch_embed.proj]"], r"random-init model\.arch has a zero output layer \(proj_out\)"),
])
def test_lora_config_errors_against_the_module_tree(over, error):
    with pytest.raises(ConfigError, match=error):
        _lora_model(*over)


@pytest.mark.parametrize("over,error", [
    (["model.lora.rank=0"], r"model\.lora\.extra_trainable: set, but model\.lora\.rank is 0"),
    (["deepspeed.precision=bf16"], r"model\.dtype: is fp32, but deepspeed\.precision is bf16"),
    (["model.lora.init=pissa"], r"model\.lora\.init: got 'pissa', expected one of 'default', 'gaussian', 'orthogonal'"),
    (["model.lora.init=orthogonal", "model.lora.rank=3"], r"orthogonal needs an even model\.lora\.rank"),
    (["model.lora.dropout=1.5"], r"model\.lora\.dropout: is 1\.5, expected a value in \[0\.0, 1\.0\]"),
    (["validation.weights=ema"], r"validation\.weights: is ema, but the run keeps no EMA; set train\.ema\.decay"),
    (["train.ema.decay=0.9", "deepspeed.zero_stage=0", "deepspeed.precision=bf16", "model.dtype=bf16"],
     r"train\.ema\.decay: .* ZeRO-0 under deepspeed\.precision=bf16 does not expose"),
    (["train.ema.update_every=0"], r"train\.ema\.update_every: is 0, expected a value >= 1"),
])
def test_lora_and_ema_config_errors_name_the_key(over, error):
    with pytest.raises(ConfigError, match=error):
        load_config(TINY, LORA + over)


def test_real_5b_architecture_counts_trainable_parameters_on_the_meta_device():
    counts = {}
    for rank in (0, 64, 128):
        # The config only names the weights; nothing is read on the meta device.
        cfg = load_config(TINY, ["run.output_dir=/tmp/unused", "model.arch={}", f"model.lora.rank={rank}",
                                 "model.pretrained=models/CogVideoX-5b-I2V/transformer"])
        with torch.device("meta"):
            model = with_lora(CogVideoXTransformer3DModel(**ARCH_5B), cfg.model)
        assert all(p.device.type == "meta" for p in model.parameters())
        counts[rank] = sum(p.numel() for p in trainable_parameters(model))
        total = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
        assert total == 5_570_479_680  # the published 5B-I2V, base weights only
    assert counts[0] == 5_570_479_680
    # 42 blocks x 4 projections 3072 -> 3072, each r x (3072 + 3072)
    assert counts[64] == 42 * 4 * 64 * 6144 == 66_060_288
    assert counts[128] == 132_120_576


def test_lora_file_has_diffusers_keys_and_restores_alpha_over_rank(tmp_path):
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    from i2v.sample.export import LORA_FILE, write_lora_weights

    cfg, model = _lora_model("model.init_std=0.2")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "proj_out" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    ours = diffusers_lora_state_dict(model)
    (tmp_path / "ours").mkdir()
    write_lora_weights(str(tmp_path / "ours"), ours, cfg)
    CogVideoXImageToVideoPipeline.save_lora_weights(str(tmp_path / "theirs"),
                                                    transformer_lora_layers=get_peft_model_state_dict(model))
    theirs = load_file(tmp_path / "theirs" / LORA_FILE)
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(k.startswith("transformer.transformer_blocks.") and "module." not in k for k in ours)

    def loaded(directory):
        base = build_transformer(cfg.model, seed=0)
        with torch.no_grad():
            base.proj_out.load_state_dict(model.proj_out.state_dict())
        state, meta = CogVideoXImageToVideoPipeline.lora_state_dict(str(directory), return_lora_metadata=True)
        CogVideoXImageToVideoPipeline.load_lora_into_transformer(state, transformer=base, metadata=meta)
        return base

    ours_loaded = loaded(tmp_path / "ours")
    assert list(ours_loaded.transformer_blocks[0].attn1.to_q.scaling.values()) == [2.0]  # alpha 8 / rank 4
    torch.testing.assert_close(_forward(ours_loaded), _forward(model), rtol=1e-6, atol=1e-6)
    # Without the metadata diffusers assumes alpha = rank (scale 1): the output would be wrong.
    bare = loaded(tmp_path / "theirs")
    assert list(bare.transformer_blocks[0].attn1.to_q.scaling.values()) == [1.0]
    assert not torch.allclose(_forward(bare), _forward(model), rtol=1e-4, atol=1e-5)
    with safe_open(str(tmp_path / "ours" / LORA_FILE), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert (meta["transformer.r"], meta["transformer.lora_alpha"]) == (4, 8.0)


def test_shipped_lora_config_is_the_published_recipe():
    cfg = load_config(str(REPO / "configs" / "cogvideox-5b-i2v-lora.yaml"))
    lora = cfg.model.lora
    assert (lora.rank, lora.alpha, lora.target_modules) == (128, 64.0, ["to_q", "to_k", "to_v", "to_out.0"])
    assert (cfg.train.lr, cfg.deepspeed.zero_stage, cfg.deepspeed.precision, cfg.model.dtype) == (1e-4, 2, "bf16", "bf16")
