"""Videos in TensorBoard as animated GIF image summaries, encoded with Pillow.

TensorBoard's own `add_video` needs moviepy; the format it writes is simply a `Summary.Image`
whose `encoded_image_string` is a GIF, which the Images dashboard plays. This writes the same
thing without the dependency.
"""

from __future__ import annotations

import io
import time

import numpy as np
import torch
from PIL import Image
from tensorboard.compat.proto.summary_pb2 import Summary


def to_uint8_frames(frames) -> np.ndarray:
    """[F, 3, H, W] float in [-1, 1] (torch) or uint8 [F, H, W, 3] (numpy/torch) -> uint8 [F, H, W, 3]."""
    if isinstance(frames, torch.Tensor):
        if frames.dtype == torch.uint8:
            frames = frames.cpu().numpy()
        else:
            x = ((frames.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
            frames = x.permute(0, 2, 3, 1).numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [F, H, W, 3], got {frames.dtype} {frames.shape}")
    return frames


def gif_bytes(frames, fps: float = 8.0) -> bytes:
    """An animated, looping GIF of the frames."""
    pixels = to_uint8_frames(frames)
    images = [Image.fromarray(p) for p in pixels]
    buf = io.BytesIO()
    # disposal=1 keeps each full frame; optimize=False so no frame is merged into another.
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:],
                   duration=max(1, int(round(1000.0 / fps))), loop=0, disposal=1, optimize=False)
    return buf.getvalue()


def video_summary(tag: str, frames, fps: float = 8.0) -> Summary:
    pixels = to_uint8_frames(frames)
    _, h, w, _ = pixels.shape
    image = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=gif_bytes(pixels, fps))
    return Summary(value=[Summary.Value(tag=tag, image=image)])


def add_video(writer, tag: str, frames, step: int, fps: float = 8.0, walltime: float | None = None) -> None:
    """Write `frames` to a `SummaryWriter` as an animated image summary under `tag`."""
    writer._get_file_writer().add_summary(video_summary(tag, frames, fps), step, walltime or time.time())
