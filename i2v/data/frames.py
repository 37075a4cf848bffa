"""First frames for sampling and validation: an image file, or the first frame of a video file.

`load_first_frame(path, height, width, what)` gives the frame as float32 [3, H, W] in [-1, 1] at the
training size (`launcher/sample.py --image`, `validation.pairs[].image`); `first_frame_pil(path, what)`
gives it as an RGB PIL image at the file's own size.

Which reader: Pillow first, on the file's bytes, not its name; whatever Pillow cannot identify goes to
PyAV, which takes the first decoded frame (presentation order). So PNG, JPEG, WebP, ... and a GIF's
first frame are read by Pillow, mp4, webm, mkv, avi, mov, ... by PyAV, and a misnamed file still works.
An image's EXIF orientation is applied: the picture is the one viewers show.

Geometry and pixels are the training clip loader's own (i2v.data.videos: `crop_box`,
then `ClipWriter`): resize with swscale's bilinear filter to cover height x width keeping the aspect
ratio, centre crop, alpha flattened onto black, then /127.5 - 1. The model learned from first frames
made that way, so the condition it is given at sampling time is made the same way: a stretch to
height x width (diffusers' VideoProcessor) would change the aspect ratio, and another filter (Pillow's
bicubic) other edges. Unlike training clips, a small first frame is upscaled without limit
(`data.video.max_upscale` drops training data; here there is nothing else to use).
"""

from __future__ import annotations

import math
import os

import av
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from i2v.config import VideoConfig
from i2v.data.videos import ClipWriter, crop_box
from i2v.core.errors import ConfigError

EXPECTED = "expected an image (PNG, JPEG, ...) or a video (mp4, webm, ...) whose first frame decodes"


def load_first_frame(path: str, height: int, width: int, what: str) -> torch.Tensor:
    """The first frame of the image or video at `path`, resized and centre-cropped to height x width:
    float32 [3, height, width] in [-1, 1]. `what` names the setting in errors (e.g. "--image")."""
    return _fit(_first_frame(path, what), height, width)


def first_frame_pil(path: str, what: str) -> Image.Image:
    """The first frame of the image or video at `path` as an RGB image at its own size (alpha flattened
    onto black, as `load_first_frame` does)."""
    frame = _first_frame(path, what)
    pixels = _fit(frame, frame.height, frame.width)
    rgb = ((pixels + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
    return Image.fromarray(rgb.numpy(), "RGB")


def _fit(frame: av.VideoFrame, height: int, width: int) -> torch.Tensor:
    """The clip loader's resize, centre crop and scaling of one frame."""
    video = VideoConfig(height=height, width=width, max_upscale=math.inf)
    sw, sh, x0, y0 = crop_box(video, frame.width, frame.height, height, width)
    writer = ClipWriter(1, sw, sh, x0, y0, height, width)
    writer.put(0, frame)
    return writer.out[0]


def _first_frame(path: str, what: str) -> av.VideoFrame:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{what}: file not found: {path}; {EXPECTED}")
    if os.path.getsize(path) == 0:
        raise ConfigError(f"{what}: {path} is empty (0 bytes); {EXPECTED}")
    try:
        return _image_frame(path)
    except UnidentifiedImageError:
        pass  # not an image: try it as a video
    except (OSError, ValueError, EOFError, Image.DecompressionBombError) as e:
        # Pillow knows the format, so this is a damaged image rather than a video.
        raise ConfigError(f"{what}: cannot read {path} as an image ({type(e).__name__}: {e}); {EXPECTED}") from None
    try:
        return _video_frame(path, what)
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise ConfigError(f"{what}: cannot read {path}: not an image Pillow knows, and PyAV cannot open it as a "
                          f"video ({type(e).__name__}: {e}); {EXPECTED}") from None


def _image_frame(path: str) -> av.VideoFrame:
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        alpha = im.has_transparency_data
        rgb = np.asarray(im.convert("RGBA" if alpha else "RGB"))
    return av.VideoFrame.from_ndarray(rgb, format="rgba" if alpha else "rgb24")


def _video_frame(path: str, what: str) -> av.VideoFrame:
    with av.open(path, metadata_errors="ignore") as container:
        if not container.streams.video:
            kinds = [s.type for s in container.streams]
            raise ConfigError(f"{what}: {path} has no video stream (streams: {kinds}); {EXPECTED}")
        stream = container.streams.video[0]
        try:
            for frame in container.decode(stream):
                return frame
        except av.error.FFmpegError as e:
            raise ConfigError(f"{what}: cannot read {path}: not an image Pillow knows, and no video frame of it "
                              f"decodes ({type(e).__name__}: {e}); {EXPECTED}") from None
    raise ConfigError(f"{what}: cannot read {path}: not an image Pillow knows, and its video stream ends before "
                      f"a frame decodes; {EXPECTED}")
