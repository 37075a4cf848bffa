"""Builds small latent shards with the real writer, for trainer and reader tests."""

from __future__ import annotations

import os

import torch

from i2v.data.latents import LatentShardWriter, save_empty_prompt

# Matches configs/tiny.yaml: 9 frames at 64x64 -> 3 latent frames of 4 x 16 x 16; text 8 x 32.
SHAPE = dict(frames=3, channels=4, height=16, width=16, text_len=8, text_dim=32, draws=2)


def sample_tensors(index: int, frames=3, channels=4, height=16, width=16, text_len=8, text_dim=32, draws=2):
    """Structured latents: a per-sample pattern drifting over frames, so there is something to learn."""
    g = torch.Generator().manual_seed(1000 + index)
    base = torch.randn(1, channels, height, width, generator=g)
    drift = torch.linspace(0, 1, frames).view(frames, 1, 1, 1)
    video = base + drift * torch.randn(1, channels, height, width, generator=g) * 0.5
    image = video[:1].unsqueeze(0).repeat(draws, 1, 1, 1, 1) + 0.05 * torch.randn(draws, 1, channels, height, width, generator=g)
    prompt = torch.randn(text_len, text_dim, generator=g)
    return video, image, prompt


def make_latent_shards(directory, shards=4, per_shard=6, corrupt: dict | None = None, first_shard=0,
                       **shape) -> list[str]:
    """Write `shards` shards of `per_shard` samples, numbered from `first_shard` (so that calls with
    different shapes can fill one directory); `corrupt` maps a global index to a defect:
    'nan', 'missing_tensor', 'wrong_shape', 'garbage' or 'no_latents'."""
    os.makedirs(directory, exist_ok=True)
    shape = {**SHAPE, **shape}
    corrupt = corrupt or {}
    paths = []
    for s in range(first_shard, first_shard + shards):
        path = os.path.join(directory, f"latents-{s:06d}.tar")
        with LatentShardWriter(path) as w:
            for i in range(per_shard):
                index = s * per_shard + i
                key = f"sample{index:05d}"
                video, image, prompt = sample_tensors(index, **shape)
                defect = corrupt.get(index)
                if defect is None:
                    w.write(key, video, image, prompt, {"index": index})
                elif defect == "nan":
                    video[0, 0, 0, 0] = float("nan")
                    w.write(key, video, image, prompt, {"index": index})
                elif defect == "wrong_shape":
                    w.write(key, video[:, :2], image[:, :, :2], prompt, {"index": index})
                elif defect == "missing_tensor":
                    from safetensors.torch import save

                    w._add(f"{key}.latents.safetensors", save({"video_latents": video, "prompt_embeds": prompt}))
                    w._add(f"{key}.json", b"{}")
                elif defect == "garbage":
                    w._add(f"{key}.latents.safetensors", os.urandom(64))
                    w._add(f"{key}.json", b"{}")
                elif defect == "no_latents":
                    w._add(f"{key}.json", b"{}")
                else:
                    raise ValueError(defect)
        paths.append(path)
    save_empty_prompt(directory, torch.zeros(shape["text_len"], shape["text_dim"]))
    return paths
