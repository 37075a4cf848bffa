"""Every random stream of training, precompute, the loaders and evaluation, derived from a named key.

A stream is asked for by name and key parts: `seed(name, *parts)` gives an int (63 bits where it feeds
torch), `rng(name, *parts)` a `random.Random`, `generator(name, *parts)` a `torch.Generator`, and
`shuffled(items, name, *parts)` a seeded permutation. The same name and parts give the same numbers in
every process, on every machine and after every resume (Python's `hash()` of a string would not).

The derivations are frozen: resumed runs, written latent shards and the demo's figures depend on the
exact numbers (tests/test_seeding.py pins them). A new stream gets a new name; an old one never changes.

Three ways a key becomes randomness, kept as they grew:
- text:     `random.Random(text)` (Python seeds a Random from a string through SHA-512);
- sha256:   the first 8 bytes of SHA-256(text), little-endian, masked to 63 bits;
- splitmix: `mix_key(seed, offset, stream)`, a splitmix64 finaliser over ints (for per-step keys).

Streams (`seed` is run.seed unless said otherwise):

| name              | kind     | key parts                        | drives                                                  |
|-------------------|----------|----------------------------------|---------------------------------------------------------|
| transformer-init  | plain    | seed                             | random init of an `model.arch` DiT (the global torch RNG, forked) |
| lora-init         | plain    | seed (+ 0x10A)                   | LoRA adapter init (the global torch RNG, forked)        |
| vae-init          | sha256   | seed (the VAE's own, else run)   | random init of an `arch` VAE                            |
| text-encoder-init | sha256   | seed (the encoder's, else run)   | random init of an `arch` text encoder                   |
| fit-vae           | sha256   | seed                             | data_prep/fit_vae.py: batch order, crops, posterior draws |
| image-sigma       | sha256   | seed, shard, key                 | precompute: the K pixel-noise levels of a first frame   |
| image-noise       | sha256   | seed, shard, key                 | precompute: the condition-noise offset of a first frame |
| video-posterior   | sha256   | seed, shard, key                 | precompute: the VAE posterior sample of a clip          |
| image-posterior   | sha256   | seed, shard, key, draw           | precompute: the posterior sample of noisy first frame `draw` |
| noise             | splitmix | seed, offset, stream             | torch backend of the noise kernel: latent noise (stream 0), condition noise (1) |
| step              | splitmix | seed, offset                     | trainer step: timesteps and CFG dropout of a micro-batch |
| latents           | text     | seed, rank, worker               | stream-order latent reader: resampled shards, shuffle buffer, image draw |
| shard-order       | text     | seed, epoch, rank, worker        | stream-order latent reader: the shard order of an epoch |
| latent-order      | sha256   | seed, epoch                      | global-order latent reader: the epoch's micro-batch permutation |
| draw              | text     | seed, position, index            | global-order latent reader: the image draw of a sample  |
| validation        | sha256   | seed, index                      | validation videos: the sampling noise of pair `index`   |
| evaluation        | sha256   | seed, index                      | evaluation: the sampling noise of pair `index`          |
| synthetic         | text     | seed                             | synthetic training clips (i2v.data.synthetic)           |
| heldout           | text     | seed                             | held-out synthetic clips, never among the training ones |

The Philox arithmetic of the Triton noise kernel stays in i2v/kernels/noise.py; it is keyed by the same
(seed, offset, stream) as the `noise` stream here, which the torch backend turns into a generator.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from typing import Callable

import torch

_MASK64 = 0xFFFFFFFFFFFFFFFF
_MASK63 = 0x7FFFFFFFFFFFFFFF


def mix_key(seed: int, offset: int, stream: int = 0) -> int:
    """Mix (seed, offset, stream) into one 63-bit generator seed (splitmix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + offset + stream * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & _MASK63


def _sha256(template: str) -> Callable[..., int]:
    def derive(**parts) -> int:
        digest = hashlib.sha256(template.format(**parts).encode()).digest()
        return int.from_bytes(digest[:8], "little") & _MASK63
    return derive


def _text(template: str) -> Callable[..., str]:
    return lambda **parts: template.format(**parts)


@dataclasses.dataclass(frozen=True)
class Stream:
    name: str
    parts: tuple[str, ...]
    derive: Callable[..., int | str]  # an int seed, or the text a random.Random is seeded with


_PRECOMPUTE = ("seed", "shard", "key")

STREAMS: dict[str, Stream] = {s.name: s for s in (
    Stream("transformer-init", ("seed",), lambda seed: seed),
    Stream("lora-init", ("seed",), lambda seed: seed + 0x10A),
    # The hashed texts are "/"-joined parts: what the single hashed-seed helper of old produced.
    Stream("vae-init", ("seed",), _sha256("{seed}/vae")),
    Stream("text-encoder-init", ("seed",), _sha256("{seed}/text_encoder")),
    Stream("fit-vae", ("seed",), _sha256("{seed}/fit_vae")),
    Stream("image-sigma", _PRECOMPUTE, _sha256("{seed}/{shard}/{key}/image_sigma/0")),
    Stream("image-noise", _PRECOMPUTE, _sha256("{seed}/{shard}/{key}/image_noise/0")),
    Stream("video-posterior", _PRECOMPUTE, _sha256("{seed}/{shard}/{key}/video_posterior/0")),
    Stream("image-posterior", (*_PRECOMPUTE, "draw"), _sha256("{seed}/{shard}/{key}/image_posterior/{draw}")),
    Stream("noise", ("seed", "offset", "stream"), mix_key),
    # Flipping bits of the seed keeps the step's draws apart from the latent noise of the same offset.
    Stream("step", ("seed", "offset"), lambda seed, offset: mix_key(seed ^ 0x5EED, offset)),
    Stream("latents", ("seed", "rank", "worker"), _text("latents-{seed}-{rank}-{worker}")),
    Stream("shard-order", ("seed", "epoch", "rank", "worker"), _text("{seed}-{epoch}-{rank}-{worker}")),
    Stream("latent-order", ("seed", "epoch"), _sha256("latent-order:{seed}:{epoch}")),
    Stream("draw", ("seed", "position", "index"), _text("draw-{seed}-{position}-{index}")),
    Stream("validation", ("seed", "index"), _sha256("{seed}/validation/{index}")),
    Stream("evaluation", ("seed", "index"), _sha256("{seed}/evaluation/{index}")),
    Stream("synthetic", ("seed",), _text("synthetic-{seed}")),
    Stream("heldout", ("seed",), _text("heldout-{seed}")),
)}


def _derive(name: str, parts: tuple) -> int | str:
    stream = STREAMS.get(name)
    if stream is None:
        raise ValueError(f"no random stream named {name!r}; the streams are {sorted(STREAMS)}")
    if len(parts) != len(stream.parts):
        raise ValueError(f"random stream {name!r} is keyed by ({', '.join(stream.parts)}), got {len(parts)} part(s)")
    return stream.derive(**dict(zip(stream.parts, parts)))


def seed(name: str, *parts) -> int:
    """The int seed of stream `name` for these key parts."""
    value = _derive(name, parts)
    if isinstance(value, str):
        raise ValueError(f"random stream {name!r} seeds a random.Random from text; use seeding.rng")
    return value


def rng(name: str, *parts) -> random.Random:
    """A `random.Random` of stream `name` for these key parts."""
    return random.Random(_derive(name, parts))


def generator(name: str, *parts, device: torch.device | str = "cpu") -> torch.Generator:
    """A `torch.Generator` on `device` seeded with `seed(name, *parts)`."""
    return torch.Generator(device=device).manual_seed(seed(name, *parts))


def shuffled(items, name: str, *parts) -> list:
    """A copy of `items` in the seeded order of stream `name`."""
    out = list(items)
    rng(name, *parts).shuffle(out)
    return out
