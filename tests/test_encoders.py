"""Encoders: offline tiny tokenizer with T5's ids, pipeline-style prompt embeddings, and clear
ConfigErrors for VAE / text-encoder directories or arches that do not fit the DiT."""

from __future__ import annotations

import json
import os

import pytest
import torch

from i2v.config import load_config
from i2v.model import encoders
from i2v.core.errors import ConfigError

from conftest import REPO
from random_vae import RANDOM_VAE

CONFIG = str(REPO / "configs" / "tiny.yaml")


def cfg(*overrides):
    return load_config(CONFIG, list(overrides))


def test_tiny_tokenizer_has_t5_special_ids_and_pads_to_max_length():
    tok = encoders.tiny_tokenizer()
    ids = tok("A Red square, moving LEFT!", padding="max_length", max_length=12, truncation=True).input_ids
    words = [encoders.TINY_VOCAB.index(w) for w in ("a", "red", "square", ",", "moving", "left", "!")]
    assert ids == words + [1] + [0] * 4  # </s> = 1 appended, <pad> = 0
    assert tok("zebra").input_ids == [2, 1]  # unknown word -> <unk> = 2
    assert len(tok("a " * 50, padding="max_length", max_length=8, truncation=True).input_ids) == 8
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1


def test_prompt_embeddings_shape_and_determinism():
    c = cfg()
    text = encoders.build_text_encoder(c)
    e = text(["a red square moving left", "a blue circle moving up", ""])
    assert e.shape == (3, c.precompute.text_encoder.max_length, 32) and e.dtype == torch.float32
    assert not torch.allclose(e[0], e[1])
    again = encoders.build_text_encoder(c)(["a red square moving left"])
    assert torch.equal(again[0], e[0])  # seeded init: the same encoder in every process
    assert text.identity["weights_sha256"] == encoders.build_text_encoder(c).identity["weights_sha256"]
    other = encoders.build_text_encoder(cfg("run.seed=1"))
    assert other.identity["weights_sha256"] != text.identity["weights_sha256"]


def test_vae_latent_channels_must_match_the_dit():
    with pytest.raises(ConfigError, match=r"precompute\.vae\.arch\.latent_channels.*out_channels 4"):
        encoders.build_vae(cfg(*RANDOM_VAE, "precompute.vae.arch.latent_channels=8"))
    with pytest.raises(ConfigError, match=r"precompute\.vae\.arch\.latnet_channels.*latent_channels"):
        encoders.build_vae(cfg(*RANDOM_VAE, "precompute.vae.arch.latnet_channels=4"))


def test_text_encoder_width_and_length_must_match_the_dit():
    with pytest.raises(ConfigError, match=r"precompute\.text_encoder\.arch\.d_model.*text_embed_dim 32"):
        encoders.build_text_encoder(cfg("precompute.text_encoder.arch.d_model=64"))
    with pytest.raises(ConfigError, match=r"precompute\.text_encoder\.max_length.*max_text_seq_length 8"):
        encoders.build_text_encoder(cfg("precompute.text_encoder.max_length=226"))


def test_pretrained_vae_directory_round_trip_and_mismatch(tmp_path):
    c = cfg()
    vae = encoders.build_vae(c)
    vae.save_pretrained(tmp_path / "vae")
    loaded = encoders.build_vae(cfg(f"precompute.vae.pretrained={tmp_path / 'vae'}", "precompute.vae.arch={}"))
    assert encoders.weights_sha256(loaded) == encoders.weights_sha256(vae)

    conf_path = tmp_path / "vae" / "config.json"
    conf = json.loads(conf_path.read_text())
    conf["latent_channels"] = 16
    conf_path.write_text(json.dumps(conf))
    with pytest.raises(ConfigError, match=r"precompute\.vae\.pretrained.*16 latent channels"):
        encoders.build_vae(cfg(f"precompute.vae.pretrained={tmp_path / 'vae'}", "precompute.vae.arch={}"))
    with pytest.raises(ConfigError, match=r"precompute\.vae\.pretrained.*not found"):
        encoders.build_vae(cfg(f"precompute.vae.pretrained={tmp_path / 'nope'}", "precompute.vae.arch={}"))
    os.remove(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ConfigError, match=r"precompute\.vae\.pretrained.*no weights"):
        encoders.build_vae(cfg(f"precompute.vae.pretrained={tmp_path / 'vae'}", "precompute.vae.arch={}"))
    with pytest.raises(ConfigError, match="only one"):
        encoders.build_vae(cfg(*RANDOM_VAE, f"precompute.vae.pretrained={tmp_path / 'vae'}"))


def test_pretrained_text_encoder_in_diffusers_layout(tmp_path):
    c = cfg()
    text = encoders.build_text_encoder(c)
    text.model.save_pretrained(tmp_path / "root" / "text_encoder")
    text.tokenizer.save_pretrained(tmp_path / "root" / "tokenizer")
    loaded = encoders.build_text_encoder(
        cfg(f"precompute.text_encoder.pretrained={tmp_path / 'root'}", "precompute.text_encoder.arch={}"))
    prompts = ["a green triangle moving down", ""]
    torch.testing.assert_close(loaded(prompts), text(prompts))
    assert loaded.identity["source"] == "pretrained"

    conf_path = tmp_path / "root" / "text_encoder" / "config.json"
    conf = json.loads(conf_path.read_text())
    conf["d_model"] = 4096
    conf_path.write_text(json.dumps(conf))
    with pytest.raises(ConfigError, match=r"precompute\.text_encoder\.pretrained.*d_model is 4096"):
        encoders.build_text_encoder(
            cfg(f"precompute.text_encoder.pretrained={tmp_path / 'root'}", "precompute.text_encoder.arch={}"))


def test_image_latent_scale_follows_invert_scale_latents():
    c = cfg(*RANDOM_VAE)
    vae = encoders.build_vae(c)
    assert encoders.image_latent_scale(vae) == pytest.approx(1.15258426)
    inverted = encoders.build_vae(cfg(*RANDOM_VAE, "precompute.vae.arch.invert_scale_latents=true"))
    assert encoders.image_latent_scale(inverted) == pytest.approx(1 / 1.15258426)
