"""Pinned values of every random stream: a change to any derivation changes resumes, shards and the
demo's figures, so it must fail here first. The numbers were recorded from the derivations as they
were before the streams moved into i2v.core.seeding."""

import random

import pytest
import torch

from i2v.core import seeding


def test_hashed_seeds_are_pinned():
    assert seeding.seed("vae-init", 7) == 553449605086204498
    assert seeding.seed("text-encoder-init", 7) == 3536282367376717412
    assert seeding.seed("evaluation", 7, 3) == 5236740727947484567
    assert seeding.seed("validation", 7, 3) == 8894250420952147218
    assert seeding.seed("fit-vae", 7) == 4049397711235604308
    assert seeding.seed("image-sigma", 7, "shard-000001.tar", "k00042") == 9080802171253468285
    assert seeding.seed("image-noise", 7, "shard-000001.tar", "k00042") == 9029166527759510022
    assert seeding.seed("video-posterior", 7, "shard-000001.tar", "k00042") == 1073032524652444638
    assert seeding.seed("image-posterior", 7, "shard-000001.tar", "k00042", 2) == 7558547263729212862


def test_model_init_seeds_are_pinned():
    assert seeding.seed("transformer-init", 7) == 7
    assert seeding.seed("lora-init", 7) == 7 + 0x10A


def test_noise_and_step_keys_are_pinned():
    assert seeding.seed("noise", 7, 1234, 0) == seeding.mix_key(7, 1234) == 1873436911133242487
    assert seeding.seed("noise", 7, 1234, 1) == 2810758599421329233
    assert seeding.mix_key(2**64 - 1, 2**64 - 1, 1) == 1394427619868332978
    assert seeding.seed("step", 7, 1234) == 2652801427830199610
    step = seeding.generator("step", 7, 1234)
    assert torch.rand(3, generator=step).tolist() == [0.7105240225791931, 0.46514207124710083, 0.2406342625617981]


def test_loader_streams_are_pinned():
    assert seeding.rng("latents", 7, 1, 2).random() == 0.414336388492742
    assert seeding.rng("latents", 7, 1, 2).randrange(1000) == 424
    assert seeding.rng("draw", 7, 11, 5).randrange(16) == 1
    assert seeding.shuffled(range(10), "shard-order", 7, 2, 1, 0) == [8, 9, 0, 7, 6, 4, 2, 5, 1, 3]
    order = seeding.generator("latent-order", 7, 2)
    assert torch.randperm(10, generator=order).tolist() == [4, 0, 5, 2, 9, 8, 6, 3, 1, 7]


def test_synthetic_streams_are_pinned():
    assert seeding.rng("synthetic", 7).random() == 0.15417365835160612
    assert seeding.rng("heldout", 7).random() == 0.011586831446085966


def test_hashed_stream_rng_is_seeded_with_its_seed():
    assert seeding.rng("validation", 7, 3).random() == random.Random(8894250420952147218).random()


def test_bad_names_and_parts_are_refused():
    with pytest.raises(ValueError, match="no random stream named 'nosie'"):
        seeding.seed("nosie", 7, 0, 0)
    with pytest.raises(ValueError, match=r"keyed by \(seed, rank, worker\), got 2"):
        seeding.rng("latents", 7, 1)
    with pytest.raises(ValueError, match="use seeding.rng"):
        seeding.seed("synthetic", 7)


def test_every_stream_is_documented():
    table = seeding.__doc__.split("| name")[1]
    for name in seeding.STREAMS:
        assert f"| {name} " in table, name
