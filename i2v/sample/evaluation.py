"""Does a model do image-to-video? Held-out synthetic pairs, sampled with the run's sampler and tracked.

Each pair is a held-out clip of `i2v.data.synthetic` (`heldout_specs`: a random stream no
training clip comes from): one coloured shape whose first frame and caption ("a red square moving
up") go to the model, and whose spec gives the true trajectory. The sampled frames go through a
tracker that finds the one object of a frame: the largest connected region of pixels far from the
frame's median (background) colour; its contrast-weighted centroid and the palette colour nearest
to the median colour of its core (`CORE_FRACTION`). Per pair:

- first-frame fidelity: the centroid of sampled frame 0 lies within 1/8 of the frame width of the
  true shape's centroid, and its nearest palette colour is the true colour;
- caption motion: the object is found in every frame, and its shift along the caption's direction
  (of a least-squares line through the centroids, from the first frame to the last) is at least a
  third of the true travel (speed x (frames - 1)) and larger than its shift across that direction.

Ablations sample the same pairs with the same noise: `zero_image` zeroes the image latents in the
sampler (fidelity must collapse), `swap_caption` asks for the opposite direction and measures the
motion against the new caption (the motion must follow it).

`evaluate` writes `RUN/eval.json` (fields in `REPORT_FIELDS`, `SUMMARY_FIELDS`, `PAIR_FIELDS`),
`RUN/eval.png` (one row per pair: true first frame | sampled frames | true frames, with a
fidelity and a motion mark; `eval-<ablation>.png` for each ablation) and the pictures and figures
to TensorBoard (`RUN/tensorboard`, tags `evaluation/...`).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from i2v.data.synthetic import COLOURS, DIRECTIONS, ClipSpec, heldout_specs, render, shape_mask

ABLATIONS = ("zero_image", "swap_caption")
CENTROID_FRACTION_OF_WIDTH = 1 / 8
MIN_ALONG_FRACTION = 1 / 3
# What the embedded default must reach on its own held-out pairs.
TARGETS = {"first_frame_fidelity": 0.9, "caption_motion": 0.8}
# RGB distance from the background below which a frame holds no object. The palette is at least
# ~110 away from the demo's grey backgrounds; sampler noise stays well under this.
MIN_CONTRAST = 40.0
# The object's colour is read from its core, the pixels within this fraction of the peak contrast:
# a decoded (blurred) edge is a blend with the background, and a median over the whole region is
# pulled toward it (a white square reads as grey-purple, yellow as orange).
CORE_FRACTION = 0.9
FORMAT = "i2v-eval-v1"

PAIR_FIELDS = (
    "index",             # pair number; the same pair (first frame, noise) in every variant
    "caption",           # the prompt sampled with
    "direction",         # the direction the motion is measured along (the caption's)
    "spec",              # the true clip: shape, colour, direction, x, y, size, speed, background
    "centroid_error_px",  # sampled frame 0's centroid to the true one, pixels (null: no object found)
    "colour",            # palette colour nearest to frame 0's object (null: no object found)
    "first_frame_ok",    # centroid within the threshold and colour right
    "tracked_frames",    # frames in which an object was found
    "travel_px",         # the true travel, speed x (frames - 1)
    "along_px",          # fitted shift along `direction`, first to last frame (null unless tracked throughout)
    "across_px",         # fitted shift across it, signed
    "along_fraction",    # along_px / travel_px
    "across_fraction",   # |across_px| / travel_px
    "motion_ok",         # along_fraction >= 1/3 and along_px > |across_px|
    "passed",            # first_frame_ok and motion_ok
)
SUMMARY_FIELDS = (
    "pairs", "first_frame_fidelity", "caption_motion", "passed",
    "median_centroid_error_px", "median_along_fraction", "picture", "per_pair",
)
REPORT_FIELDS = (
    "format", "checkpoint", "step", "seed", "frames", "size", "sampler", "thresholds", "targets",
    "meets_targets", "seconds", *SUMMARY_FIELDS, "ablations",
)


# --------------------------------------------------------------------------- the tracker


@dataclass(frozen=True)
class Track:
    x: float  # centroid, pixels (pixel centres at +0.5, as `synthetic.render` draws)
    y: float
    colour: str  # nearest palette colour
    rgb: tuple[float, float, float]  # median colour of the object's pixels


def nearest_colour(rgb) -> str:
    names = sorted(COLOURS)
    palette = np.array([COLOURS[n] for n in names], np.float32)
    return names[int(np.argmin(np.linalg.norm(palette - np.asarray(rgb, np.float32), axis=1)))]


def track(frame: np.ndarray) -> Track | None:
    """The object of a uint8 [H, W, 3] frame, or None when nothing stands out from the background."""
    from scipy import ndimage

    pixels = frame.astype(np.float32)
    background = np.median(pixels.reshape(-1, 3), axis=0)
    contrast = np.linalg.norm(pixels - background, axis=-1)
    # The 20th-highest contrast stands for the object, so that a few stray pixels cannot.
    k = min(20, contrast.size)
    peak = float(np.partition(contrast.ravel(), -k)[-k])
    if peak < MIN_CONTRAST:
        return None
    labels, count = ndimage.label(contrast >= 0.5 * peak)
    weights = np.where(labels > 0, contrast, 0.0)
    # The largest region by contrast mass is the object; smaller ones are sampler noise.
    mass = ndimage.sum(weights, labels, index=np.arange(1, count + 1))
    region = labels == 1 + int(np.argmax(mass))
    w = np.where(region, contrast, 0.0)
    yy, xx = np.mgrid[0:frame.shape[0], 0:frame.shape[1]].astype(np.float32) + 0.5
    total = float(w.sum())
    core = region & (contrast >= CORE_FRACTION * peak)
    rgb = tuple(float(c) for c in np.median(pixels[core if core.any() else region], axis=0))
    return Track(float((w * xx).sum() / total), float((w * yy).sum() / total), nearest_colour(rgb), rgb)


def true_centroids(spec: ClipSpec, frames: int, width: int, height: int) -> np.ndarray:
    """[F, 2] (x, y): the centroid of the shape as rendered in each frame."""
    out = []
    for t in range(frames):
        ys, xs = np.nonzero(shape_mask(spec, t, width, height))
        out.append((xs.mean() + 0.5, ys.mean() + 0.5))
    return np.array(out)


def fitted_shift(points: np.ndarray, direction: str) -> tuple[float, float]:
    """(along, across) `direction` of a least-squares line through [F, 2] points, first to last frame.

    A line rather than last-minus-first: one frame's jitter in a sampled video moves it little.
    """
    d = np.array(DIRECTIONS[direction], np.float64)
    across = np.array([-d[1], d[0]])
    t = np.arange(len(points), dtype=np.float64)
    velocity = np.polyfit(t, points.astype(np.float64), 1)[0]  # pixels per frame, (x, y)
    shift = velocity * (len(points) - 1)
    return float(shift @ d), float(shift @ across)


def score_pair(index: int, spec: ClipSpec, direction: str, frames: np.ndarray) -> dict:
    """The per-pair record (`PAIR_FIELDS`) of sampled uint8 frames [F, H, W, 3] against `spec`."""
    n, height, width = frames.shape[:3]
    truth = true_centroids(spec, 1, width, height)[0]
    tracks = [track(f) for f in frames]
    first = tracks[0]
    error = None if first is None else math.hypot(first.x - truth[0], first.y - truth[1])
    first_ok = first is not None and error <= CENTROID_FRACTION_OF_WIDTH * width and first.colour == spec.colour
    travel = spec.speed * (n - 1)
    found = sum(t is not None for t in tracks)
    along = across = None
    if found == n and n > 1:
        along, across = fitted_shift(np.array([(t.x, t.y) for t in tracks]), direction)
    motion_ok = along is not None and along >= MIN_ALONG_FRACTION * travel and along > abs(across)
    caption = ClipSpec(**{**asdict(spec), "direction": direction}).caption
    r = lambda v: None if v is None else round(v, 3)  # noqa: E731
    return {
        "index": index, "caption": caption, "direction": direction, "spec": asdict(spec),
        "centroid_error_px": r(error), "colour": None if first is None else first.colour,
        "first_frame_ok": bool(first_ok), "tracked_frames": found, "travel_px": r(travel),
        "along_px": r(along), "across_px": r(across),
        "along_fraction": None if along is None else r(along / travel),
        "across_fraction": None if across is None else r(abs(across) / travel),
        "motion_ok": bool(motion_ok), "passed": bool(first_ok and motion_ok),
    }


def summarise(records: list[dict], picture: str | None) -> dict:
    """The `SUMMARY_FIELDS` of one variant's per-pair records."""
    def frac(key):
        return round(sum(r[key] for r in records) / len(records), 4)

    def median(key):
        values = [r[key] for r in records if r[key] is not None]
        return None if not values else round(float(np.median(values)), 3)

    return {
        "pairs": len(records), "first_frame_fidelity": frac("first_frame_ok"), "caption_motion": frac("motion_ok"),
        "passed": frac("passed"), "median_centroid_error_px": median("centroid_error_px"),
        "median_along_fraction": median("along_fraction"), "picture": picture, "per_pair": records,
    }


# --------------------------------------------------------------------------- the picture


def picture(rows: list[tuple[np.ndarray, np.ndarray, dict]], gap: int = 4) -> np.ndarray:
    """uint8 [H, W, 3]: per pair (sampled frames, true frames, record) one row of
    mark | true first frame | sampled frames | true frames. The mark is two squares, fidelity over
    motion, green for a pass and red for a fail."""
    n, h, w = rows[0][0].shape[:3]
    mark = max(4, h // 4)
    width = mark + gap + w + gap + n * w + gap + n * w
    out = np.full((len(rows) * (h + gap) - gap, width, 3), 255, np.uint8)
    green, red = np.array([40, 170, 60], np.uint8), np.array([210, 40, 40], np.uint8)
    for i, (sampled, true, record) in enumerate(rows):
        top = i * (h + gap)
        half = h // 2
        out[top:top + half - 1, :mark] = green if record["first_frame_ok"] else red
        out[top + half:top + h, :mark] = green if record["motion_ok"] else red
        x = mark + gap
        out[top:top + h, x:x + w] = true[0]
        x += w + gap
        out[top:top + h, x:x + n * w] = np.concatenate(list(sampled), axis=1)
        x += n * w + gap
        out[top:top + h, x:x + n * w] = np.concatenate(list(true), axis=1)
    return out


def save_png(image: np.ndarray, path: str) -> None:
    from PIL import Image

    tmp = f"{path}.tmp-{os.getpid()}.png"
    Image.fromarray(image).save(tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- sampling and the report


class RunSampler:
    """The run's own sampler: the checkpoint's DiT, the run's VAE and T5, `validation` steps and guidance."""

    def __init__(self, cfg, checkpoint: str, steps: int | None = None, guidance: float | None = None):
        from i2v.sample.setup import load_sampler

        self.cfg = cfg
        self.steps = steps or cfg.validation.num_inference_steps
        self.guidance = cfg.validation.guidance_scale if guidance is None else guidance
        self.frames = cfg.validation.num_frames or cfg.data.video.frames
        # A committed checkpoint only, with the VAE and T5 it trained with (or an error).
        parts = load_sampler(cfg, checkpoint, scheduler="ddim")
        self.transformer, self.vae, self.text = parts.transformer, parts.vae, parts.text
        self.negative = self.text([""])[0]
        self.scheduler, self.ofs = parts.scheduler, parts.ofs
        self.checkpoint = parts.checkpoint  # the step directory, also when given a checkpoints/ root

    def settings(self) -> dict:
        return {"scheduler": "ddim", "steps": self.steps, "guidance": self.guidance,
                "image_latents": "sample"}  # as the diffusers pipeline encodes first frames

    def __call__(self, indices: list[int], first_frames: np.ndarray, captions: list[str],
                 zero_image: bool = False) -> np.ndarray:
        """Sampled uint8 frames [N, F, H, W, 3] of N pairs in one batch; pair i's noise depends on
        (run.seed, indices[i]) only, so a pair samples the same in any batch."""
        import torch

        from i2v.core import seeding
        from i2v.sample.sampling import sample_videos, to_uint8

        images = torch.from_numpy(first_frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        generators = [seeding.generator("evaluation", self.cfg.run.seed, i) for i in indices]
        frames = sample_videos(
            self.transformer, self.vae, self.scheduler, images, self.text(captions), self.negative,
            num_frames=self.frames, num_inference_steps=self.steps, guidance_scale=self.guidance,
            generators=generators, zero_image=zero_image,
            ofs=self.ofs,
        )
        return to_uint8(frames)


def pair_specs(cfg, pairs: int) -> list[ClipSpec]:
    v = cfg.data.video
    frames = cfg.validation.num_frames or v.frames
    return heldout_specs(pairs, seed=cfg.run.seed, frames=frames, width=v.width, height=v.height)


def run_variant(specs: list[ClipSpec], sample, ablation: str | None = None, progress=None, batch_size: int = 16):
    """Sample and score every pair under one variant, `batch_size` pairs a batch; returns (records, picture rows)."""
    n = sample.frames
    height, width = sample.cfg.data.video.height, sample.cfg.data.video.width
    records, rows = [], []
    for start in range(0, len(specs), batch_size):
        batch = specs[start:start + batch_size]
        asked = [spec.reversed() if ablation == "swap_caption" else spec for spec in batch]
        true = [np.stack([render(spec, t, width, height) for t in range(n)]) for spec in batch]
        sampled = sample(list(range(start, start + len(batch))), np.stack([t[0] for t in true]),
                         [a.caption for a in asked], zero_image=ablation == "zero_image")
        for i, spec in enumerate(batch):
            record = score_pair(start + i, spec, asked[i].direction, sampled[i])
            records.append(record)
            rows.append((sampled[i], true[i], record))
        if progress is not None:
            progress.update(len(batch))
    return records, rows


def evaluate(cfg, checkpoint: str, pairs: int = 16, ablations: tuple[str, ...] = (), out_dir: str | None = None,
             steps: int | None = None, guidance: float | None = None, progress: bool = True) -> dict:
    """Sample `pairs` held-out pairs (and each ablation) from `checkpoint`; write the report and pictures."""
    from tqdm import tqdm

    from i2v.checkpoint.commit import TAG_RE
    from i2v.core.errors import ConfigError
    from i2v.core.fsutil import write_json_atomic

    if pairs < 1:
        raise ConfigError(f"--pairs: is {pairs}, expected at least 1")
    for a in ablations:
        if a not in ABLATIONS:
            raise ConfigError(f"--ablation: {a!r} is not one of {', '.join(ABLATIONS)}")
    out_dir = out_dir or cfg.run.output_dir
    os.makedirs(out_dir, exist_ok=True)
    start = time.time()
    sample = RunSampler(cfg, checkpoint, steps, guidance)
    specs = pair_specs(cfg, pairs)
    checkpoint = sample.checkpoint
    match = TAG_RE.match(os.path.basename(checkpoint))
    summaries, images = {}, {}
    bar = tqdm(total=pairs * (1 + len(ablations)), desc="evaluate", unit="pair", disable=not progress)
    for name in ("pairs", *ablations):
        records, rows = run_variant(specs, sample, None if name == "pairs" else name, bar)
        file = "eval.png" if name == "pairs" else f"eval-{name}.png"
        images[name] = picture(rows)
        save_png(images[name], os.path.join(out_dir, file))
        summaries[name] = summarise(records, file)
    bar.close()

    main = summaries.pop("pairs")
    report = {
        "format": FORMAT, "checkpoint": os.path.abspath(checkpoint), "step": int(match.group(1)) if match else None,
        "seed": cfg.run.seed, "frames": sample.frames, "size": [cfg.data.video.height, cfg.data.video.width],
        "sampler": sample.settings(),
        "thresholds": {"centroid_px": CENTROID_FRACTION_OF_WIDTH * cfg.data.video.width,
                       "min_along_fraction": round(MIN_ALONG_FRACTION, 4)},
        "targets": TARGETS,
        "meets_targets": all(main[k] >= v for k, v in TARGETS.items()),
        "seconds": round(time.time() - start, 1),
        **main,
        "ablations": summaries,
    }
    write_json_atomic(os.path.join(out_dir, "eval.json"), report)
    _to_tensorboard(os.path.join(cfg.run.output_dir, "tensorboard"), report, images)
    return report


def _to_tensorboard(logdir: str, report: dict, images: dict) -> None:
    """The pictures as `evaluation/<pairs|ablation>`, the figures as `evaluation/[<ablation>/]<figure>`."""
    from torch.utils.tensorboard import SummaryWriter

    step = report["step"] or 0
    with SummaryWriter(logdir) as writer:
        for name, image in images.items():
            writer.add_image(f"evaluation/{name}", image, step, dataformats="HWC")
        for key in ("first_frame_fidelity", "caption_motion"):
            writer.add_scalar(f"evaluation/{key}", report[key], step)
            for name, summary in report["ablations"].items():
                writer.add_scalar(f"evaluation/{name}/{key}", summary[key], step)


def headline(report: dict) -> str:
    """The figures a person reads first, in two lines."""
    lines = [f"first-frame fidelity {report['first_frame_fidelity']:.0%} (target {TARGETS['first_frame_fidelity']:.0%}), "
             f"caption motion {report['caption_motion']:.0%} (target {TARGETS['caption_motion']:.0%}) "
             f"on {report['pairs']} held-out pairs"]
    for name, s in report["ablations"].items():
        lines.append(f"  ablation {name}: fidelity {s['first_frame_fidelity']:.0%}, motion {s['caption_motion']:.0%}")
    return "\n".join(lines)
