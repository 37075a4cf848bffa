"""Synthetic captioned clips for the demo and tests: one coloured shape moving where the caption says.

"a red square moving left" - the first frame fixes the shape, colour and position, and the caption
fixes the direction, so an I2V model has exactly what it needs to predict the motion. Clips are
written as `{key}.mp4` (H.264 through PyAV) + `{key}.txt`, the folder layout `make_shards` reads,
with `specs.json` beside them. Held-out clips (`heldout_specs`, the demo's held-out frame and the
evaluation's pairs) come from a random stream of their own, so no training clip is among them.

    python -m i2v.data.synthetic --output DIR --clips 48 [--seed 0 --heldout DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
from dataclasses import dataclass

import av
import numpy as np
from PIL import Image

from i2v.core import seeding
from i2v.core.fsutil import write_json_atomic

COLOURS = {
    "red": (220, 40, 40), "green": (40, 190, 70), "blue": (50, 90, 230), "yellow": (235, 215, 40),
    "white": (240, 240, 240), "purple": (150, 60, 200), "orange": (245, 140, 30), "cyan": (40, 210, 220),
}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


@dataclass(frozen=True)
class ClipSpec:
    shape: str
    colour: str
    direction: str
    x: float  # centre of the shape in frame 0, pixels
    y: float
    size: int  # half-width of the shape, pixels
    speed: float  # pixels per frame
    background: tuple[int, int, int]

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction}"

    def reversed(self) -> "ClipSpec":
        """The same first frame, moving the opposite way (its caption says so)."""
        return dataclasses.replace(self, direction=OPPOSITE[self.direction])


def random_spec(rng: random.Random, width: int, height: int, frames: int) -> ClipSpec:
    """A random clip whose shape stays fully inside the frame for all `frames`, moving either way.

    The start leaves room for the travel in both directions along the motion axis, so where the
    shape starts says nothing about where it goes: only the caption does, and a clip reversed
    (`ClipSpec.reversed`) stays inside the frame too.
    """
    shape, colour, direction = rng.choice(SHAPES), rng.choice(sorted(COLOURS)), rng.choice(sorted(DIRECTIONS))
    side = min(width, height)
    # Shapes a sixth to a third of the frame wide, that travel a fifth to a third of it over the
    # clip: big enough for a tiny VAE to keep their colour, with motion plain to see and to track.
    size = rng.randint(max(3, side // 12), max(4, side // 6))
    speed = rng.uniform(0.2, 0.3) * side / max(1, frames - 1)
    travel = speed * (frames - 1)
    dx, dy = DIRECTIONS[direction]

    def start(extent: int, d: int) -> float:
        margin = size + 1 + (travel if d else 0.0)
        lo, hi = margin, extent - margin
        if hi < lo:  # the frame is too small for this speed: start in the middle
            return extent / 2
        return rng.uniform(lo, hi)

    grey = rng.randint(20, 90)
    background = tuple(int(np.clip(grey + rng.randint(-15, 15), 0, 255)) for _ in range(3))
    return ClipSpec(shape, colour, direction, start(width, dx), start(height, dy), size, speed, background)


def shape_mask(spec: ClipSpec, index: int, width: int, height: int) -> np.ndarray:
    """Where the shape covers frame `index`: bool [H, W]."""
    dx, dy = DIRECTIONS[spec.direction]
    cx, cy = spec.x + dx * spec.speed * index, spec.y + dy * spec.speed * index
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    u, v = xx - cx, yy - cy
    s = spec.size
    if spec.shape == "square":
        return (np.abs(u) <= s) & (np.abs(v) <= s)
    if spec.shape == "circle":
        return u * u + v * v <= s * s
    # An upward triangle: base at v = s, apex at v = -s.
    return (v <= s) & (v >= -s) & (np.abs(u) <= (v + s) / 2)


def render(spec: ClipSpec, index: int, width: int, height: int) -> np.ndarray:
    """Frame `index` of the clip as uint8 [H, W, 3]."""
    img = np.empty((height, width, 3), np.uint8)
    img[:] = spec.background
    img[shape_mask(spec, index, width, height)] = COLOURS[spec.colour]
    return img


def write_mp4(path: str, frames: list[np.ndarray], fps: int) -> None:
    h, w = frames[0].shape[:2]
    with av.open(path, "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"bf": "0", "crf": "18"}
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


SPECS_FILE = "specs.json"


def make_clips(output: str, clips: int, *, seed: int = 0, frames: int = 12, width: int = 64, height: int = 64,
               fps: int = 8, directions_per_frame: int = 1) -> list[ClipSpec]:
    """Write `clips` clips as clip-NNNNN.mp4 + .txt into `output`; returns their specs.

    With `directions_per_frame` 2, every drawn first frame is written twice, moving the drawn way
    and the opposite way: two clips that differ only in their caption's direction, so that only
    the caption can tell a model which way to move (the first frame alone cannot).

    `specs.json` (the settings and every clip's spec, so its true trajectory) is written last:
    a folder that has one for the same settings is complete, and is kept as it is.
    """
    if directions_per_frame not in (1, 2):
        raise ValueError(f"--directions-per-frame: is {directions_per_frame}, expected 1 or 2")
    settings = {"seed": seed, "clips": clips, "frames": frames, "width": width, "height": height, "fps": fps,
                "directions_per_frame": directions_per_frame}
    kept = _finished(output, settings)
    if kept is not None:
        return kept
    os.makedirs(output, exist_ok=True)
    rng = seeding.rng("synthetic", seed)
    specs = []
    for i in range(clips):
        spec = random_spec(rng, width, height, frames) if i % directions_per_frame == 0 else spec.reversed()
        base = os.path.join(output, f"clip-{i:05d}")
        write_mp4(base + ".mp4", [render(spec, t, width, height) for t in range(frames)], fps)
        with open(base + ".txt", "w") as f:
            f.write(spec.caption)
        specs.append(spec)
    write_json_atomic(os.path.join(output, SPECS_FILE), {**settings, "specs": [dataclasses.asdict(s) for s in specs]})
    return specs


def _finished(output: str, settings: dict) -> list[ClipSpec] | None:
    try:
        with open(os.path.join(output, SPECS_FILE)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if any(record.get(k) != v for k, v in settings.items()):
        return None
    return [ClipSpec(**{**s, "background": tuple(s["background"])}) for s in record["specs"]]


def heldout_specs(count: int, *, seed: int = 0, frames: int = 12, width: int = 64, height: int = 64) -> list[ClipSpec]:
    """`count` clips drawn from a stream of their own: never among `make_clips`' clips for any seed."""
    rng = seeding.rng("heldout", seed)
    return [random_spec(rng, width, height, frames) for _ in range(count)]


def make_heldout(output: str, *, seed: int = 0, frames: int = 12, width: int = 64, height: int = 64,
                 fps: int = 8, name: str = "heldout") -> tuple[str, str]:
    """The first held-out clip: its first frame as PNG, its caption, and the full clip for reference.

    Returns (png path, caption).
    """
    os.makedirs(output, exist_ok=True)
    spec = heldout_specs(1, seed=seed, frames=frames, width=width, height=height)[0]
    base = os.path.join(output, name)
    Image.fromarray(render(spec, 0, width, height)).save(base + ".png")
    write_mp4(base + ".mp4", [render(spec, t, width, height) for t in range(frames)], fps)
    with open(base + ".txt", "w") as f:
        f.write(spec.caption)
    return base + ".png", spec.caption


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write synthetic captioned clips (mp4 + txt) of moving shapes.")
    p.add_argument("--output", required=True, help="folder for clip-NNNNN.mp4 / .txt")
    p.add_argument("--clips", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--directions-per-frame", type=int, default=1, choices=(1, 2),
                   help="2: each first frame moving both ways along its axis, as two clips")
    p.add_argument("--heldout", default=None, help="also write heldout.png / .txt / .mp4 into this folder")
    a = p.parse_args(argv)
    geometry = dict(frames=a.frames, width=a.width, height=a.height, fps=a.fps)
    make_clips(a.output, a.clips, seed=a.seed, directions_per_frame=a.directions_per_frame, **geometry)
    print(f"{a.clips} clips in {a.output} ({SPECS_FILE}: their specs and true trajectories)")
    if a.heldout:
        png, caption = make_heldout(a.heldout, seed=a.seed, **geometry)
        print(f"held-out first frame: {png} ({caption!r})")


if __name__ == "__main__":
    main()
