"""First frames from image and video files (i2v/data/frames.py): the clip loader's geometry, clear errors."""

import json
import os

import av
import numpy as np
import pytest
import torch
from PIL import Image

import clips
from i2v.config import VideoConfig
from i2v.data.videos import decode_video_sample
from i2v.core.errors import ConfigError
from i2v.data.frames import first_frame_pil, load_first_frame


def pixels(rgb: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> [3, H, W] in [-1, 1], as the clip loader scales them."""
    return torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1.0


def pyav_frame0(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return next(c.decode(video=0)).to_ndarray(format="rgb24")


def loader_first_frame(path, height: int, width: int) -> torch.Tensor:
    """The training clip loader's frame 0 of `path`: a two-frame clip stated to start at the first frame."""
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        start = next(c.decode(stream)).time
        fps = float(stream.average_rate or stream.guessed_rate)
    meta = {"fps": fps, "frames": 2, "start_time": start, "last_time": start + 1 / fps}
    sample = {os.path.splitext(str(path))[1][1:]: open(path, "rb").read(), "json": json.dumps(meta).encode(),
              "__key__": "k"}
    video = VideoConfig(frames=2, height=height, width=width)
    return decode_video_sample(sample, video)["image"]


def test_png_is_resized_on_its_short_side_then_centre_cropped(tmp_path):
    # 80 x 40: red | green | blue bands. Covering 20 x 20 scales it to 40 x 20 and keeps the middle
    # half, which is all green (a stretch would keep red and blue at the edges).
    rgb = np.zeros((40, 80, 3), np.uint8)
    rgb[:, :16, 0] = 255
    rgb[:, 16:64, 1] = 200
    rgb[:, 64:, 2] = 255
    Image.fromarray(rgb).save(tmp_path / "bands.png")

    native = load_first_frame(str(tmp_path / "bands.png"), 40, 80, "--image")
    assert native.dtype == torch.float32 and torch.equal(native, pixels(rgb))
    small = load_first_frame(str(tmp_path / "bands.png"), 20, 20, "--image")
    assert small.shape == (3, 20, 20)
    green = pixels(np.broadcast_to(np.array([0, 200, 0], np.uint8), (20, 20, 3)))
    assert (small - green).abs().max() <= 2 / 127.5
    # Taller than wide: the crop keeps the middle rows.
    tall = load_first_frame(str(tmp_path / "bands.png"), 20, 10, "--image")
    assert tall.shape == (3, 20, 10) and (tall - green[:, :, :10]).abs().max() <= 2 / 127.5


def test_png_matches_the_clip_loader_on_the_same_pixels(tmp_path):
    """The same pixels as a PNG and as a lossless video give the same first frame, bit for bit."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (30, 52, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "noise.png")
    with av.open(str(tmp_path / "noise.mov"), "w") as out:
        stream = out.add_stream("png", rate=8)
        stream.width, stream.height, stream.pix_fmt = 52, 30, "rgb24"
        for _ in range(2):
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    assert np.array_equal(pyav_frame0(tmp_path / "noise.mov"), rgb)
    for height, width in ((16, 16), (24, 40), (60, 100)):
        ours = load_first_frame(str(tmp_path / "noise.png"), height, width, "--image")
        assert torch.equal(ours, loader_first_frame(tmp_path / "noise.mov", height, width)), (height, width)


def test_png_alpha_is_flattened_onto_black_and_exif_orientation_applied(tmp_path):
    rgba = np.zeros((2, 4, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:, :2, 3] = 255  # left half opaque, right half half-transparent
    rgba[:, 2:, 3] = 51
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    frame = load_first_frame(str(tmp_path / "alpha.png"), 2, 4, "--image")
    assert torch.allclose(frame[:, :, :2], torch.full((3, 2, 2), 200 / 127.5 - 1))
    assert torch.allclose(frame[:, :, 2:], torch.full((3, 2, 2), 200 / 127.5 * 0.2 - 1))

    # Stored 4 wide x 2 high, red on the left, tagged "rotate 90 degrees clockwise to display":
    # shown 2 wide x 4 high with red on top.
    rgb = np.zeros((2, 4, 3), np.uint8)
    rgb[:, :2, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(tmp_path / "rotated.png", exif=exif)
    frame = load_first_frame(str(tmp_path / "rotated.png"), 4, 2, "--image")
    assert frame.shape == (3, 4, 2)
    assert (frame[0, :2] == 1).all() and (frame[0, 2:] == -1).all()


@pytest.mark.parametrize("name", ["realshort.mp4", "big_buck_bunny_1s.webm", "grey_swimmer_854x480.mp4"])
def test_real_video_gives_frame_0_as_pyav_and_the_clip_loader_decode_it(shared_videos, name):
    path = shared_videos / name
    ref = pyav_frame0(path)
    h, w = ref.shape[:2]
    assert torch.equal(load_first_frame(str(path), h, w, "validation.pairs[0].image"), pixels(ref))
    assert np.array_equal(np.asarray(first_frame_pil(str(path), "validation.pairs[0].image")), ref)
    # Resized and cropped: exactly the training loader's frame 0 at the same geometry.
    for height, width in ((40, 40), (48, 32), (64, 96)):
        ours = load_first_frame(str(path), height, width, "validation.pairs[0].image")
        assert ours.shape == (3, height, width)
        assert torch.equal(ours, loader_first_frame(path, height, width)), (height, width)


@pytest.mark.parametrize("name, codec", [("c.mp4", "libx264"), ("c.webm", "libvpx-vp9"), ("c.avi", "mpeg4"),
                                         ("c.gif", None)])
def test_video_first_frame_is_the_first_of_the_clip(tmp_path, name, codec):
    """Every frame of these clips shows its index (tests/clips.py), a brightness step or more apart."""
    if codec:
        path = clips.encode(tmp_path / name, frames=6, width=64, height=48, codec=codec)
    else:  # an animated GIF, which Pillow reads (its first frame) and the clip loader decodes with PyAV
        path = str(tmp_path / name)
        frames = [Image.fromarray(clips.pattern(i, 64, 48)) for i in range(6)]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=40, loop=0)
    frame = load_first_frame(path, 24, 32, "--image")
    assert frame.shape == (3, 24, 32) and frame.min() >= -1 and frame.max() <= 1
    assert clips.frame_index(frame) == 0
    assert clips.frame_index(np.asarray(first_frame_pil(path, "--image"))) == 0
    assert torch.equal(frame, loader_first_frame(path, 24, 32))


def test_unusable_files_raise_config_errors_naming_the_key_and_the_path(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("a caption, not a picture\n" * 20)
    Image.fromarray(np.full((64, 64, 3), 100, np.uint8)).save(tmp_path / "grey.png")
    mp4 = clips.encode(tmp_path / "good.mp4", frames=24, width=64, height=48)
    webm = open(clips.encode(tmp_path / "good.webm", frames=24, width=64, height=48, codec="libvpx-vp9"), "rb").read()
    header_only = tmp_path / "header_only.webm"  # the stream is declared, its first cluster cut off
    header_only.write_bytes(webm[:webm.index(bytes.fromhex("1F43B675")) + 8])
    cases = {
        str(tmp_path / "missing.png"): "file not found",
        clips.empty(tmp_path / "empty.mp4"): "is empty (0 bytes)",
        clips.truncated(tmp_path / "grey.png", tmp_path / "cut.png", keep=0.6): "as an image (OSError: image file is",
        str(text): "not an image Pillow knows, and no video frame of it decodes",
        clips.truncated(mp4, tmp_path / "truncated.mp4", keep=0.5): "PyAV cannot open it as a video",
        clips.random_bytes(tmp_path / "noise.webm"): "PyAV cannot open it as a video",
        str(header_only): "its video stream ends before a frame decodes",
        clips.audio_only(tmp_path / "sound.mp4"): "has no video stream (streams: ['audio'])",
    }
    for path, words in cases.items():
        for call in (lambda: load_first_frame(path, 16, 16, "validation.pairs[2].image"),
                     lambda: first_frame_pil(path, "validation.pairs[2].image")):
            with pytest.raises(ConfigError) as e:
                call()
            message = str(e.value)
            assert message.startswith("validation.pairs[2].image: ") and path in message, message
            assert words in message and "; expected an image (PNG, JPEG, ...) or a video" in message, message
