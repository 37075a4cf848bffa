"""Probe one video file with PyAV: is it usable, and what is it (the `{key}.json` of a shard).

The probe decodes every frame once (one thread), since "frames" and "last_time" are
recorded as decoded, not as the container claims; the loader trusts these numbers to
place clips without decoding a file end to end.
"""

from __future__ import annotations

import hashlib
import os

import av

from i2v.data.videos import EMPTY, NO_VIDEO, TOO_FEW, TRUNCATED, UNDECODABLE, BadSample, open_video


def probe_bytes(data: bytes, source: str = "", min_frames: int = 1) -> dict:
    """Metadata of a readable video, or BadSample(reason) naming why it is not usable."""
    container, stream = open_video(data)
    try:
        n, first, last = 0, None, None
        try:
            for frame in container.decode(stream):
                if frame.pts is not None and frame.time is not None:
                    t = float(frame.time)
                    first = t if first is None else first
                    last = t
                n += 1
        except (av.error.FFmpegError, ValueError, MemoryError) as e:
            raise BadSample(TRUNCATED if n else UNDECODABLE, f"{type(e).__name__}: {e}") from None
        if n == 0:
            raise BadSample(UNDECODABLE, "no frame decoded")
        stated = stream.frames or 0
        if stated > n + 1:
            raise BadSample(TRUNCATED, f"container lists {stated} frames, {n} decoded")
        rate = stream.average_rate or stream.guessed_rate
        if first is None or last is None:
            fps = float(rate) if rate else 25.0
            first, last = 0.0, (n - 1) / fps
        elif n > 1 and last > first:
            fps = (n - 1) / (last - first)  # what the decoded timestamps say, VFR included
        else:
            fps = float(rate) if rate else 25.0
        if n < min_frames:
            raise BadSample(TOO_FEW, f"{n} decoded frames < --min-frames {min_frames}")
        ctx = stream.codec_context
        return {
            "fps": fps,
            "frames": n,
            "duration": (last - first) + 1.0 / fps,
            "start_time": first,
            "last_time": last,
            "width": ctx.width,
            "height": ctx.height,
            "codec": ctx.name,
            "pix_fmt": ctx.pix_fmt,
            "source": source,
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
        }
    finally:
        container.close()


def probe_file(path: str | os.PathLike, min_frames: int = 1) -> tuple[dict, bytes]:
    """(metadata, file bytes); BadSample when unusable."""
    with open(path, "rb") as f:
        data = f.read()
    return probe_bytes(data, source=str(path), min_frames=min_frames), data


__all__ = ["probe_bytes", "probe_file", "BadSample", "EMPTY", "NO_VIDEO", "TOO_FEW", "TRUNCATED", "UNDECODABLE"]
