"""Video shards -> clips: a streaming decode loader built from small WebDataset stages.

Shards use the video2dataset layout: `{key}.mp4` (or .webm, .avi, ...) holding the original
bytes, `{key}.txt` the caption and `{key}.json` metadata written by `data_prep/make_shards.py`.

A sample comes out as::

    {"video": float32 [F, 3, H, W] in [-1, 1], "image": frame 0 [3, H, W],
     "caption": str, "__key__": str, "meta": dict}

The entry point is `iter_shard_clips(url, video)`: one shard in stored order, each clip centred in
time and centre-cropped (the precompute job and data_prep/fit_vae.py read this). Training reads the
latents precompute writes, never these clips.

Decoding is PyAV from bytes in memory with one thread per worker. Frames are picked by
timestamp (variable frame rate safe), after seeking near the clip start, so a short clip from
a long video decodes only a keyframe interval's worth of extra frames. Bad samples are
skipped, counted by reason and named by key through `BadSamples`; too many stop the run.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import struct
from typing import Any, Callable, Iterable, Iterator

import av
import torch
from av.video.reformatter import VideoReformatter
from i2v.config import RemoteConfig, VideoConfig
from i2v.data import remote
from i2v.data.shards import BadSamples
from i2v.core.errors import ConfigError

VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi", "m4v", "mpg", "mpeg", "ts", "flv", "ogv", "wmv", "gif")

# Reasons a sample is skipped; make_shards writes the same words into rejects.jsonl.
EMPTY = "empty"
UNDECODABLE = "undecodable"
NO_VIDEO = "no video stream"
TRUNCATED = "truncated"
TOO_FEW = "too few frames"
TOO_SMALL = "too small"
NO_VIDEO_MEMBER = "no video file in sample"
SHARD_ERROR = "shard read error"
BAD_META = "bad metadata"


class BadSample(Exception):
    """A sample that cannot be used; `reason` is one of the words above."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------- containers


def declared_size_exceeds(data: bytes) -> bool:
    """True when the container's own size fields claim more bytes than there are.

    Catches files cut short in transfer, which FFmpeg often opens and plays up to the cut
    without complaint. Knows ISO BMFF (mp4/mov), EBML (mkv/webm) and RIFF (avi).
    """
    n = len(data)
    if n >= 8 and data[4:8] == b"ftyp":
        pos = 0
        while pos + 8 <= n:
            size, = struct.unpack(">I", data[pos:pos + 4])
            if size == 1:
                if pos + 16 > n:
                    return True
                size, = struct.unpack(">Q", data[pos + 8:pos + 16])
            elif size == 0:  # box runs to the end of the file
                return False
            if size < 8:
                return False  # not a box walk we understand; let FFmpeg judge
            pos += size
        return pos > n
    if n >= 12 and data[:4] == b"RIFF":
        size, = struct.unpack("<I", data[4:8])
        return size + 8 > n
    if n >= 4 and data[:4] == b"\x1a\x45\xdf\xa3":
        pos = 4
        header_size, pos = _ebml_vint(data, pos)
        if header_size is None:
            return True
        pos += header_size
        if data[pos:pos + 4] != b"\x18\x53\x80\x67":  # Segment
            return pos > n
        seg_size, pos = _ebml_vint(data, pos + 4)
        if seg_size is None:
            return True
        return seg_size >= 0 and pos + seg_size > n
    return False


def _ebml_vint(data: bytes, pos: int) -> tuple[int | None, int]:
    """An EBML size at `pos`: (value or -1 for 'unknown', position after it); None if cut."""
    if pos >= len(data):
        return None, pos
    first = data[pos]
    width = 1
    while width <= 8 and not first & (0x80 >> (width - 1)):
        width += 1
    if width > 8 or pos + width > len(data):
        return None, pos
    value = first & (0xFF >> width)
    for b in data[pos + 1:pos + width]:
        value = (value << 8) | b
    if value == (1 << (7 * width)) - 1:
        value = -1
    return value, pos + width


def open_video(data: bytes):
    """(container, video stream) from bytes, or BadSample with the reason (empty, truncated, ...)."""
    if not data:
        raise BadSample(EMPTY, "0 bytes")
    if declared_size_exceeds(data):
        raise BadSample(TRUNCATED, f"container declares more than the {len(data)} bytes present")
    try:
        container = av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise BadSample(UNDECODABLE, str(e)) from None
    if not container.streams.video:
        kinds = [s.type for s in container.streams]
        container.close()
        raise BadSample(NO_VIDEO, f"streams: {kinds}")
    stream = container.streams.video[0]
    # One decoding thread per worker: parallelism comes from DataLoader workers, and
    # FFmpeg's own threads would fight them for the same cores.
    stream.thread_type = "SLICE"
    stream.codec_context.thread_count = 1
    return container, stream


@dataclasses.dataclass
class ClipInfo:
    """What the sampler needs to know about a video before decoding it."""

    width: int
    height: int
    fps: float  # average frame rate
    frames: int | None  # decodable frames, if known
    start: float  # time of the first frame, seconds
    last: float | None  # time of the last frame, seconds, if known


def clip_info(stream, container, meta: dict | None) -> ClipInfo:
    """Prefer the as-decoded numbers make_shards stored; fall back to container headers.

    Width and height always come from the decoder: other tools' metadata may describe
    the file before it was resized.
    """
    meta = meta or {}
    ctx = stream.codec_context
    if all(isinstance(meta.get(k), (int, float)) for k in ("fps", "frames", "start_time", "last_time")):
        return ClipInfo(width=ctx.width, height=ctx.height, fps=float(meta["fps"]), frames=int(meta["frames"]),
                        start=float(meta["start_time"]), last=float(meta["last_time"]))
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 25.0  # 25 only sets tolerances when the file states no rate
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    last = None
    if stream.duration:
        last = start + float(stream.duration * stream.time_base) - 1.0 / fps
    elif container.duration and len(container.streams) == 1:
        last = start + container.duration / 1e6 - 1.0 / fps
    return ClipInfo(width=ctx.width, height=ctx.height, fps=fps, frames=stream.frames or None, start=start, last=last)


# --------------------------------------------------------------------------- sampling


def frame_step(video: VideoConfig, info: ClipInfo) -> float:
    """Seconds between output frames: 1/fps when resampling, else stride source frames."""
    return 1.0 / video.fps if video.fps else video.stride / info.fps


def choose_bucket(video: VideoConfig, info: ClipInfo) -> tuple[int, int, int]:
    """(height, width, frames): the configured size, or the nearest aspect/length bucket."""
    if not video.buckets:
        return video.height, video.width, video.frames
    dt = frame_step(video, info)
    span = _available(info)
    fitting = []
    for b in video.buckets:
        h, w, f = (int(x) for x in b)
        if span is None or (f - 1) * dt <= span + 0.5 / info.fps:
            fitting.append((abs(math.log((info.width / info.height) / (w / h))), -f, h, w, f))
    if not fitting:
        raise BadSample(TOO_FEW, f"shortest bucket needs more than the {span:.3f}s available")
    _, _, h, w, f = min(fitting)
    return h, w, f


def _available(info: ClipInfo) -> float | None:
    return None if info.last is None else info.last - info.start


def plan_times(video: VideoConfig, info: ClipInfo, frames: int) -> list[float]:
    """Timestamps (seconds) of the frames to take, centred in the clip."""
    dt = frame_step(video, info)
    span = (frames - 1) * dt
    avail = _available(info)
    if avail is None:
        raise BadSample(UNDECODABLE, "duration unknown")  # caller measures it by decoding first
    tol = 0.5 / info.fps
    if span > avail + tol:
        raise BadSample(TOO_FEW, f"needs {span:.3f}s for {frames} frames, has {avail:.3f}s")
    slack = max(avail - span, 0.0)
    # Start on the source frame grid so each target lands on a frame, not between two.
    starts = int(math.floor(slack * info.fps + 1e-6))
    t0 = info.start + (starts // 2) / info.fps
    return [t0 + i * dt for i in range(frames)]


def crop_box(video: VideoConfig, src_w: int, src_h: int, out_h: int, out_w: int) -> tuple[int, int, int, int]:
    """(scaled_w, scaled_h, x0, y0): resize to cover out_h x out_w keeping aspect, then centre-crop."""
    if src_w < 1 or src_h < 1:
        raise BadSample(TOO_SMALL, f"{src_w}x{src_h}")
    scale = max(out_h / src_h, out_w / src_w)
    if scale > video.max_upscale:
        raise BadSample(TOO_SMALL, f"{src_w}x{src_h} needs x{scale:.1f} upscaling to {out_h}x{out_w} "
                                   f"(data.video.max_upscale={video.max_upscale})")
    sw, sh = max(out_w, round(src_w * scale)), max(out_h, round(src_h * scale))
    return sw, sh, (sw - out_w) // 2, (sh - out_h) // 2


# --------------------------------------------------------------------------- decoding


class ClipWriter:
    """Scales, crops and converts the chosen frames straight into float32 [F, 3, H, W] in [-1, 1].

    Scaling happens within the decoder's pixel format and the conversion to RGB after it:
    both passes take FFmpeg's SIMD paths, where one combined scale+convert takes the
    generic one. (Planar RGB output would spare the transpose, but FFmpeg's unscaled
    YUV->GBRP path writes garbage into the last columns of odd widths.) The swscale
    contexts are reused across a clip's frames, as building one costs more than using it.
    Alpha is flattened onto black. In a DataLoader worker the output is allocated in
    shared memory, which spares a copy when it is sent to the main process.
    """

    def __init__(self, frames: int, sw: int, sh: int, x0: int, y0: int, out_h: int, out_w: int):
        self.size, self.box = (sw, sh), (x0, y0, out_h, out_w)
        self.out = torch.empty((frames, 3, out_h, out_w), dtype=torch.float32)
        if torch.utils.data.get_worker_info() is not None:
            self.out.share_memory_()
        self.resize, self.convert = VideoReformatter(), VideoReformatter()
        self.last: tuple[Any, int] = (None, -1)

    def put(self, j: int, frame) -> None:
        if frame is self.last[0]:  # the same source frame again (output rate above the source's)
            self.out[j].copy_(self.out[self.last[1]])
            return
        fmt = frame.format
        alpha = any(c.is_alpha for c in fmt.components)
        sw, sh = self.size
        target = "rgba" if alpha else "rgb24"
        if fmt.has_palette or fmt.is_bit_stream or fmt.is_bayer:
            rgb = self.convert.reformat(frame, width=sw, height=sh, format=target, interpolation="BILINEAR")
        else:
            small = self.resize.reformat(frame, width=sw, height=sh, interpolation="BILINEAR")
            rgb = self.convert.reformat(small, format=target)
        x0, y0, h, w = self.box
        img = torch.from_numpy(rgb.to_ndarray()[y0:y0 + h, x0:x0 + w]).permute(2, 0, 1)
        o = self.out[j]
        # Divide, not multiply by 1/127.5: 255 must land on exactly 1.0 after the shift.
        torch.div(img[:3], 127.5, out=o)
        if alpha:
            o.mul_(img[3].to(torch.float32).div_(255.0))
        o.sub_(1.0)
        self.last = (frame, j)


def _frame_time(frame, index: int, fps: float) -> float:
    return float(frame.time) if frame.pts is not None and frame.time is not None else index / fps


def _measure(container, stream, info: ClipInfo) -> ClipInfo:
    """Decode timestamps once when neither metadata nor headers give the clip's length."""
    n, last = 0, None
    for packet in container.demux(stream):
        for frame in packet.decode():
            last = _frame_time(frame, n, info.fps)
            n += 1
    if n == 0:
        raise BadSample(UNDECODABLE, "no frame decoded")
    container.seek(0)
    return dataclasses.replace(info, frames=n, last=last)


def decode_frames(container, stream, info: ClipInfo, times: list[float], put: Callable) -> int:
    """Hand the frame nearest to each of `times` to `put(j, frame)`; returns frames decoded."""
    tol = 0.5 / info.fps
    seeked = times[0] - info.start > tol
    if seeked:
        # Lands on the keyframe at or before t0; frames in between are decoded and dropped.
        container.seek(max(int(times[0] / float(stream.time_base)), 0), stream=stream, backward=True,
                       any_frame=False)
    decoded, j = 0, 0
    prev, prev_t = None, 0.0
    try:
        for frame in container.decode(stream):
            t = _frame_time(frame, decoded, info.fps)
            if decoded == 0 and seeked and t > times[0] + tol:
                # Some demuxers land after the target; start over from the beginning.
                container.seek(0)
                seeked = False
                continue
            decoded += 1
            while j < len(times) and t >= times[j] - 1e-6:
                closer_prev = prev is not None and times[j] - prev_t < t - times[j]
                put(j, prev if closer_prev else frame)
                j += 1
            if j == len(times):
                break
            prev, prev_t = frame, t
    except av.error.FFmpegError as e:
        raise BadSample(TRUNCATED if decoded else UNDECODABLE, str(e)) from None
    # Targets past the last frame take it if they are within a frame of it.
    while j < len(times) and prev is not None and times[j] - prev_t <= 2 * tol:
        put(j, prev)
        j += 1
    if j < len(times):
        reason = TOO_FEW if decoded else UNDECODABLE
        raise BadSample(reason, f"stream ended after {decoded} decoded frames, wanted frame at {times[j]:.3f}s")
    return decoded


def video_member(sample: dict) -> tuple[str, bytes]:
    for ext in VIDEO_EXTS:
        if ext in sample:
            return ext, sample[ext]
    raise BadSample(NO_VIDEO_MEMBER, f"members: {sorted(k for k in sample if not k.startswith('__'))}")


def decode_video_sample(sample: dict, video: VideoConfig) -> dict:
    """One raw WebDataset sample of a video shard -> the clip dict, or BadSample."""
    ext, data = video_member(sample)
    try:
        meta = json.loads(sample["json"]) if sample.get("json") else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadSample(BAD_META, str(e)) from None
    if not isinstance(meta, dict):
        raise BadSample(BAD_META, f"expected a JSON object, got {type(meta).__name__}")
    caption = sample.get("txt", b"")
    caption = caption.decode("utf-8", errors="replace") if isinstance(caption, bytes) else str(caption)
    container, stream = open_video(data)
    try:
        return _decode_open(container, stream, sample, ext, meta, caption, video)
    except (av.error.FFmpegError, ValueError, OSError, MemoryError) as e:
        # A damaged stream can fail anywhere in FFmpeg; it is this sample's fault, not the run's.
        raise BadSample(UNDECODABLE, f"{type(e).__name__}: {e}") from None
    finally:
        container.close()


def _decode_open(container, stream, sample, ext, meta, caption, video) -> dict:
    info = clip_info(stream, container, meta)
    if info.last is None:
        info = _measure(container, stream, info)
    out_h, out_w, frames = choose_bucket(video, info)
    min_frames = video.min_frames if video.min_frames is not None else frames
    if info.frames is not None and info.frames < min_frames:
        raise BadSample(TOO_FEW, f"{info.frames} decodable frames < {min_frames} (data.video.min_frames)")
    times = plan_times(video, info, frames)
    sw, sh, x0, y0 = crop_box(video, info.width, info.height, out_h, out_w)
    writer = ClipWriter(frames, sw, sh, x0, y0, out_h, out_w)
    decoded = decode_frames(container, stream, info, times, writer.put)
    clip = writer.out
    meta = dict(meta, ext=ext, clip_start=times[0], clip_fps=1.0 / frame_step(video, info),
                crop=[x0, y0, out_w, out_h], resized=[sw, sh], decoded_frames=decoded, bucket=[out_h, out_w, frames])
    # `image` is a view of frame 0 (no copy); clone it before changing `video` in place.
    return {"video": clip, "image": clip[0], "caption": caption, "__key__": sample["__key__"], "meta": meta}


# --------------------------------------------------------------------------- stages


class CountingHandler:
    """A WebDataset error handler that counts shard failures instead of only warning.

    A broken shard is counted once, under its URL, however many stages notice it.
    """

    def __init__(self, bad: BadSamples):
        self.bad = bad
        self.url: str | None = None
        self.counted: str | None = None

    def track(self, urls: Iterable[str]) -> Iterator[dict]:
        for url in urls:
            self.url, self.counted = url, None
            yield {"url": url}

    def __call__(self, exn: Exception) -> bool:
        if self.counted != self.url:
            self.counted = self.url
            if isinstance(exn, remote.RemoteError):  # missing, denied, unreachable or retried out
                self.bad.add_bad(str(self.url), exn.reason, exn.detail)
            else:
                self.bad.add_bad(str(self.url), SHARD_ERROR, f"{type(exn).__name__}: {exn}")
        return True


def raw_samples(urls: Iterable[str], bad: BadSamples, remote_cfg: RemoteConfig | None = None) -> Iterator[dict]:
    """Shard URLs (paths, http(s)://, s3://) -> raw samples ({"__key__", "mp4", "txt", "json", ...}),
    shard errors counted; remote reads resume through network faults (i2v.data.remote)."""
    handler = CountingHandler(bad)
    return remote.tar_samples(handler.track(urls), handler, remote_cfg)


def decoded(samples: Iterable[dict], video: VideoConfig, bad: BadSamples) -> Iterator[dict]:
    """Raw samples -> clips; bad ones counted by reason and key, then skipped."""
    for sample in samples:
        key = sample.get("__key__", "?")
        try:
            clip = decode_video_sample(sample, video)
        except BadSample as e:
            bad.add_bad(f"{sample.get('__url__', '?')}:{key}", e.reason, e.detail)
            continue
        bad.add_good()
        yield clip


def check_video_config(video: VideoConfig) -> None:
    for i, b in enumerate(video.buckets):
        if not (isinstance(b, (list, tuple)) and len(b) == 3 and all(isinstance(x, int) and x > 0 for x in b)):
            raise ConfigError(f"data.video.buckets[{i}]: is {b!r}, expected [height, width, frames] positive ints")
    if video.fps is not None and video.fps <= 0:
        raise ConfigError(f"data.video.fps: is {video.fps}, expected > 0 or null")
    if video.max_upscale <= 0:
        raise ConfigError(f"data.video.max_upscale: is {video.max_upscale}, expected > 0")


# --------------------------------------------------------------------------- entry points


def iter_shard_clips(url: str, video: VideoConfig, *, bad: BadSamples | None = None,
                     remote_cfg: RemoteConfig | None = None) -> Iterator[dict]:
    """Clips of ONE shard in stored order (no shuffle, no split); bad samples counted and skipped.

    Each clip is centred in time and centre-cropped. Pass `bad` to share a counter (and its
    max-bad-fraction stop) across shards.
    `url` is used as given: take it from `expand_shards`, which applies the `pipe:` guard.
    """
    check_video_config(video)
    bad = bad if bad is not None else BadSamples()
    yield from decoded(raw_samples([url], bad, remote_cfg), video, bad)
