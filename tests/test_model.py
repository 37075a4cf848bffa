import os

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel

from i2v.config import ModelConfig, load_config
from i2v.core.errors import ConfigError
from i2v.model.transformer import build_transformer, rotary_embeddings
from conftest import REPO

TINY = load_config(REPO / "configs" / "tiny.yaml")


def test_inline_model_is_seeded_and_zero_output():
    a = build_transformer(TINY.model, seed=0)
    b = build_transformer(TINY.model, seed=0)
    c = build_transformer(TINY.model, seed=1)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert not torch.equal(pa["patch_embed.proj.weight"], pc["patch_embed.proj.weight"])
    assert torch.count_nonzero(pa["proj_out.weight"]) == 0  # explicit init: the untrained model predicts 0
    assert a.config.in_channels == 2 * a.config.out_channels


def test_pretrained_directory_round_trip_and_missing_files(tmp_path):
    model = build_transformer(TINY.model, seed=3)
    model.save_pretrained(tmp_path / "transformer")
    loaded = build_transformer(ModelConfig(pretrained=str(tmp_path / "transformer")))
    for (n, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(p, q), n
    os.remove(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ConfigError, match=r"model.pretrained: .*transformer has no weights"):
        build_transformer(ModelConfig(pretrained=str(tmp_path / "transformer")))
    with pytest.raises(ConfigError, match="model.pretrained: directory not found"):
        build_transformer(ModelConfig(pretrained=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        build_transformer(ModelConfig(pretrained=str(tmp_path / "empty")))


def test_t2v_checkpoint_is_refused_for_i2v(tmp_path):
    arch = {**TINY.model.arch, "in_channels": 4}
    CogVideoXTransformer3DModel(**arch).save_pretrained(tmp_path / "t2v")
    with pytest.raises(ConfigError, match=r"in_channels \(4\) must be 2 x out_channels \(4\)"):
        build_transformer(ModelConfig(pretrained=str(tmp_path / "t2v")))


def test_unknown_arch_key_did_you_mean():
    with pytest.raises(ConfigError, match=r"model.arch.num_layer: .*Did you mean 'model.arch.num_layers'"):
        build_transformer(ModelConfig(arch={**TINY.model.arch, "num_layer": 2}))


def test_forward_shape_with_rotary():
    model = build_transformer(TINY.model)
    rot = rotary_embeddings(model.config, 3, 8, 8, "cpu")
    assert rot[0].shape == (3 * 4 * 4, TINY.model.arch["attention_head_dim"])
    out = model(hidden_states=torch.randn(2, 3, 8, 8, 8), encoder_hidden_states=torch.randn(2, 32, 32),
                timestep=torch.tensor([1, 500]), image_rotary_emb=rot, return_dict=False)[0]
    assert out.shape == (2, 3, 4, 8, 8)


@pytest.mark.parametrize("name", ["cogvideox-5b-i2v.yaml", "cogvideox-2b-i2v.yaml"])
def test_real_model_configs_load_and_name_missing_weights(name):
    cfg = load_config(REPO / "configs" / name, ["deepspeed.zero_stage=3"])
    assert cfg.data.video.frames == 49 and cfg.deepspeed.precision == "bf16"
    with pytest.raises(ConfigError, match="model.pretrained"):
        build_transformer(cfg.model)


def test_arch_file_builds_the_inline_model_and_guards_pretrained_weights(tmp_path):
    import json

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"_class_name": "CogVideoXTransformer3DModel", **TINY.model.arch}))
    from_file = build_transformer(ModelConfig(arch_file=str(path), init_std=TINY.model.init_std), seed=0)
    inline = build_transformer(TINY.model, seed=0)
    assert all(torch.equal(p, q) for p, q in zip(from_file.parameters(), inline.parameters()))
    inline.save_pretrained(tmp_path / "transformer")
    build_transformer(ModelConfig(pretrained=str(tmp_path / "transformer"), arch_file=str(path)))  # they agree
    layers = TINY.model.arch["num_layers"]
    path.write_text(json.dumps({**TINY.model.arch, "num_layers": layers + 1}))
    with pytest.raises(ConfigError, match=rf"model.arch_file: .* differs from .*config.json in num_layers \({layers} there, {layers + 1} here\)"):
        build_transformer(ModelConfig(pretrained=str(tmp_path / "transformer"), arch_file=str(path)))
    with pytest.raises(ConfigError, match="model.arch_file: file not found"):
        build_transformer(ModelConfig(arch_file=str(tmp_path / "nope.json")))
    with pytest.raises(ConfigError, match="model.arch: set only one of model.arch and model.arch_file"):
        load_config(REPO / "configs" / "tiny.yaml", [f"model.arch_file={path}", "model.arch={num_layers: 2}"])
