"""Synthetic clips for data tests, encoded with PyAV, plus broken files.

Every frame is flat grey with a brightness that encodes its index, so a test can read
back which source frame the loader picked: `level(i)` on the left half, `level(i // 40)`
on the right half (long clips wrap the left half every 40 frames).
"""

from __future__ import annotations

import fractions
import os

import av
import numpy as np

STEP = 6  # brightness step per frame index; wide enough to survive lossy coding


def level(i: int) -> int:
    return 16 + STEP * (i % 40)


def frame_index(rgb: np.ndarray) -> int:
    """Inverse of the pattern for a decoded frame [H, W, 3] or [3, H, W] in uint8 or [-1, 1]."""
    a = np.asarray(rgb, dtype=np.float64)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    if a.min() < 0 or a.max() <= 1.0:
        a = (a + 1.0) * 127.5
    w = a.shape[1]
    left = a[:, : max(w // 4, 1)].mean()
    right = a[:, w - max(w // 4, 1):].mean()
    lo = int(round((left - 16) / STEP)) % 40
    hi = int(round((right - 16) / STEP)) % 40
    return hi * 40 + lo


def pattern(i: int, width: int, height: int, alpha: bool = False, opacity: int = 255) -> np.ndarray:
    img = np.empty((height, width, 4 if alpha else 3), np.uint8)
    half = max(width // 2, 1)
    img[:, :half, :3] = level(i)
    img[:, half:, :3] = level(i // 40)
    if alpha:
        img[..., 3] = opacity
    return img


def encode(path: str | os.PathLike, *, frames: int = 12, width: int = 64, height: int = 48, fps: int = 24,
           codec: str = "libx264", pix_fmt: str = "yuv420p", gop: int = 12, pts: list[int] | None = None,
           time_base: fractions.Fraction | None = None, audio: bool = False, options: dict | None = None,
           opacity: int = 255) -> str:
    """Encode `frames` pattern frames to `path` (container from the extension).

    `pts` (with `time_base`) gives explicit, possibly irregular, timestamps: a VFR clip.
    """
    path = str(path)
    with av.open(path, "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.gop_size = gop
        opts = {"bf": "0"} if codec == "libx264" else {}
        opts.update(options or {})
        stream.options = opts
        if pts is not None:
            stream.time_base = time_base or fractions.Fraction(1, 1000)
            stream.codec_context.time_base = stream.time_base
        astream = out.add_stream("aac", rate=16000) if audio else None
        has_alpha = "a" in pix_fmt.replace("yuv", "").replace("gray", "") or pix_fmt in ("rgba", "argb", "bgra")
        for i in range(frames):
            img = pattern(i, width, height, alpha=has_alpha, opacity=opacity)
            frame = av.VideoFrame.from_ndarray(img, format="rgba" if has_alpha else "rgb24")
            if pts is not None:
                frame.pts = pts[i]
                frame.time_base = stream.time_base
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
        if astream is not None:
            _write_tone(out, astream, seconds=frames / fps)
    return path


def _write_tone(out, astream, seconds: float) -> None:
    n = int(16000 * seconds)
    t = np.arange(n) / 16000.0
    samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
    for start in range(0, n, 1024):
        chunk = av.AudioFrame.from_ndarray(samples[:, start:start + 1024], format="fltp", layout="mono")
        chunk.sample_rate = 16000
        for packet in astream.encode(chunk):
            out.mux(packet)
    for packet in astream.encode():
        out.mux(packet)


def audio_only(path: str | os.PathLike, seconds: float = 0.5) -> str:
    path = str(path)
    with av.open(path, "w") as out:
        astream = out.add_stream("aac", rate=16000)
        _write_tone(out, astream, seconds)
    return path


def truncated(src: str | os.PathLike, dst: str | os.PathLike, keep: float = 0.5) -> str:
    data = open(src, "rb").read()
    with open(dst, "wb") as f:
        f.write(data[: int(len(data) * keep)])
    return str(dst)


def random_bytes(path: str | os.PathLike, n: int = 4096, seed: int = 0) -> str:
    with open(path, "wb") as f:
        f.write(np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes())
    return str(path)


def empty(path: str | os.PathLike) -> str:
    open(path, "wb").close()
    return str(path)


def caption(path: str | os.PathLike, text: str) -> None:
    base = os.path.splitext(str(path))[0]
    with open(base + ".txt", "w") as f:
        f.write(text)
