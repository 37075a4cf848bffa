"""The offline precompute job: video shards -> latent shards (VAE latents, noisy first-frame latents, T5).

One output shard per input shard, named from it (`shard-000003.tar` -> `latents-000003.tar`), and
input shard i goes to rank i % world. Every random number of a sample (posterior sample, sigma
draws, first-frame noise) is seeded from (run.seed, input shard, sample key), and clips are batched
only within a shard in stored order, so the output bytes do not depend on the number of ranks,
on which rank ran a shard, or on how often the job was restarted.

Image conditioning: K draws per clip of `vae.encode(frame0 + sigma * eps)`, log sigma ~
N(image_log_sigma_mean, image_log_sigma_std): the first frame plus noise, never noise alone.

Decoding runs in `data.num_workers` DataLoader workers (a background thread with 0), each
reading whole shards; the bad-sample counts of a shard come back from its worker with the
shard's end, so records, manifest and log lines count every worker's rejects.

Resume: a shard is finished when both `latents-N.tar` and its record `latents-N.json` exist
(the tar is renamed into place first, so a record never describes a missing tar). An `s3://bucket/prefix`
output is written the same way into a local staging folder, and each finished shard is uploaded, then
its record, then (once all are there) rejects.jsonl and manifest.json last. Anything else
is redone; stale temporary files of a killed run are removed. The rank that completes the last
shard merges the records into `manifest.json` and `rejects.jsonl`; no collective is needed.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import queue
import re
import shutil
import sys
import threading
import time
from typing import Iterator

import torch
from tqdm import tqdm

from i2v.config import Config
from i2v.data import latent_order
from i2v.data.latents import EMPTY_PROMPT_FILE, MANIFEST_FILE, LatentShardWriter, save_empty_prompt, write_manifest
from i2v.data.remote import OutputFolder
from i2v.data.shards import BadSamples, expand_shards, sum_by_reason
from i2v.data.videos import iter_shard_clips
from i2v.model import encoders
from i2v.core import seeding
from i2v.core.fsutil import sha256_file, write_json_atomic
from i2v.core.errors import ConfigError, DataError
from i2v.kernels.noise import condition_noise

FORMAT = "i2v-latents-v1"
# The first-frame noise: torch's CPU generator keyed by (run.seed, shard, key), on any device.
CONDITION_NOISE_STREAM = "torch-cpu"
REJECTS_FILE = "rejects.jsonl"


# --------------------------------------------------------------------------- naming and assignment


def output_name(url: str) -> str:
    """`.../shard-000003.tar` -> `latents-000003.tar`; other names keep their stem."""
    stem = os.path.basename(url.rstrip("/")).split("?")[0]
    stem = stem[: -len(".tar")] if stem.endswith(".tar") else stem
    stem = re.sub(r"^shard-", "", stem)
    return f"latents-{stem}.tar"


def record_path(out_dir: str, name: str) -> str:
    return os.path.join(out_dir, name[: -len(".tar")] + ".json")


def assignment(urls: list[str], rank: int, world: int) -> list[tuple[str, str]]:
    """(input url, output name) of this rank's shards: input shard i -> rank i % world."""
    names = [output_name(u) for u in urls]
    seen: dict[str, str] = {}
    for u, n in zip(urls, names):
        if n in seen:
            raise DataError(f"data.video_shards: {seen[n]} and {u} would both write {n}; give input shards distinct names")
        seen[n] = u
    return [(u, n) for i, (u, n) in enumerate(zip(urls, names)) if i % world == rank]


def rank_world() -> tuple[int, int]:
    """RANK / WORLD_SIZE as set by torchrun and the deepspeed launcher; (0, 1) without them."""
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise ConfigError(f"RANK / WORLD_SIZE: not integers ({os.environ.get('RANK')!r}, {os.environ.get('WORLD_SIZE')!r})") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK / WORLD_SIZE: rank {rank} is not in [0, {world})")
    return rank, world


# --------------------------------------------------------------------------- the encoder side


class Precompute:
    """Builds the encoders once; turns clips into latent samples."""

    def __init__(self, cfg: Config, device: str | torch.device = "cpu"):
        self.cfg, self.pre, self.device = cfg, cfg.precompute, torch.device(device)
        lengths = [("data.video.frames", cfg.data.video.frames)]
        lengths += [(f"data.video.buckets[{i}]", b[2]) for i, b in enumerate(cfg.data.video.buckets) if len(b) == 3]
        for key, frames in lengths:
            if not isinstance(frames, int) or (frames - 1) % 4:
                raise ConfigError(
                    f"{key}: {frames!r} frames; the CogVideoX VAE compresses time 4x causally, so clips "
                    "need 4k + 1 frames (e.g. 9, 49)"
                )
        if self.pre.samples_per_shard:
            raise ConfigError(
                f"precompute.samples_per_shard: is {self.pre.samples_per_shard}; output shards mirror input shards "
                "one to one (that keeps reruns and rank counts from changing the output), so set it to 0 and "
                "choose the shard size with make_shards --samples-per-shard"
            )
        self.vae = encoders.build_vae(cfg).to(self.device)
        self.text = encoders.build_text_encoder(cfg)
        self.text.model.to(self.device)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.image_scale = encoders.image_latent_scale(self.vae)
        self.vae_identity = encoders.vae_identity(cfg, self.vae)
        self.text_identity = self.text.identity
        self.settings = {
            "format": FORMAT,
            "seed": cfg.run.seed,
            "latents": self.pre.latents,
            "image_draws": self.pre.image_draws,
            "image_log_sigma_mean": self.pre.image_log_sigma_mean,
            "image_log_sigma_std": self.pre.image_log_sigma_std,
            "batch_size": self.pre.batch_size,
            # data.video.random_start and .random_crop were switches of a training clip loader that never
            # changed precompute's centred clips; their old defaults stay here so that shards written
            # before the switches went keep their fingerprint and a precompute job still resumes on them.
            "video": {**dataclasses.asdict(cfg.data.video), "random_start": True, "random_crop": True},
            "vae": self.vae_identity,
            "text_encoder": self.text_identity,
            "condition_noise": CONDITION_NOISE_STREAM,
        }
        # A model directory may move between runs; its contents' hashes, not its path or its files'
        # mtimes (the per-file digest), identify it.
        self.portable = {k: ({n: x for n, x in v.items() if n not in ("path", "digest")} if isinstance(v, dict) else v)
                         for k, v in self.settings.items()}
        blob = json.dumps(self.portable, sort_keys=True).encode()
        self.fingerprint = hashlib.sha256(blob).hexdigest()

    def _generator(self, stream: str, *parts) -> torch.Generator:
        return seeding.generator(stream, self.cfg.run.seed, *parts)

    def sigmas(self, shard: str, key: str) -> torch.Tensor:
        """K pixel-noise levels of one clip's first frame: exp(N(mean, std)), fp32 [K]."""
        g = self._generator("image-sigma", shard, key)
        z = torch.randn(self.pre.image_draws, generator=g, dtype=torch.float64)
        return torch.exp(self.pre.image_log_sigma_mean + self.pre.image_log_sigma_std * z).float()

    def noisy_first_frames(self, shard: str, key: str, image: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """[K, 3, H, W] on the CPU: frame 0 plus sigma_k * eps_k for each draw k.

        The noise is drawn on the CPU with the torch backend whatever device encodes: the CUDA
        kernel's Philox stream and the CUDA generator differ from the CPU's, and a job resumed on
        another device type must continue the same stream (`CONDITION_NOISE_STREAM` is part of the
        fingerprint). A few first frames per clip cost nothing next to the VAE.
        """
        frames = image.cpu().unsqueeze(0).expand(len(sigma), *image.shape).contiguous()
        offset = seeding.seed("image-noise", self.cfg.run.seed, shard, key)
        return condition_noise(frames, sigma, seed=self.cfg.run.seed, offset=offset, backend="torch")

    def _latents(self, pixels: torch.Tensor, gens: list[torch.Generator] | None) -> torch.Tensor:
        """pixels [B, 3, F, H, W] -> [B, f, C, h, w], unscaled."""
        mean, std = encoders.vae_posterior(self.vae, pixels.to(self.device))
        lat = encoders.posterior_latents(mean, std, self.pre.latents, gens)
        return lat.permute(0, 2, 1, 3, 4).cpu()

    @torch.no_grad()
    def encode(self, shard: str, clips: list[dict]) -> list[dict]:
        """Same-shape clips of one shard -> samples for `LatentShardWriter.write`."""
        sample = self.pre.latents == "sample"
        keys = [c["__key__"] for c in clips]
        k = self.pre.image_draws
        video = torch.stack([c["video"] for c in clips]).permute(0, 2, 1, 3, 4).contiguous()  # [B, 3, F, H, W]
        gens = [self._generator("video-posterior", shard, key) for key in keys] if sample else None
        video_latents = self._latents(video, gens) * self.scaling_factor

        sigmas = [self.sigmas(shard, key) for key in keys]
        noisy = torch.cat([self.noisy_first_frames(shard, key, c["image"], s) for key, c, s in zip(keys, clips, sigmas)])
        gens = [self._generator("image-posterior", shard, key, d) for key in keys for d in range(k)] if sample else None
        image_latents = self._latents(noisy.unsqueeze(2), gens) * self.image_scale  # [B*K, 1, C, h, w]
        image_latents = image_latents.view(len(clips), k, *image_latents.shape[1:])

        prompt_embeds = self.text([c["caption"] for c in clips]).cpu()
        out = []
        for i, c in enumerate(clips):
            m = c.get("meta", {})
            meta = {
                "source_key": c["__key__"],
                "source_shard": shard,
                "source": m.get("source"),
                "source_sha256": m.get("sha256"),
                "caption": c["caption"],
                "frames": int(c["video"].shape[0]),
                "latent_frames": int(video_latents.shape[1]),
                "fps": m.get("clip_fps", m.get("fps")),
                "clip_start": m.get("clip_start"),
                "size": [int(c["video"].shape[2]), int(c["video"].shape[3])],
                "scaling_factor": self.scaling_factor,
                "image_latent_scale": self.image_scale,
                "latents": self.pre.latents,
                "sigmas": [float(s) for s in sigmas[i]],
                "vae": self.vae_identity,
                "text_encoder": self.text_identity,
            }
            out.append({
                "key": c["__key__"],
                "video_latents": video_latents[i],
                "image_latents": image_latents[i],
                "prompt_embeds": prompt_embeds[i],
                "meta": meta,
            })
        return out

    def empty_prompt(self) -> torch.Tensor:
        return self.text([""])[0].cpu()


# --------------------------------------------------------------------------- the job


def batches(clips: Iterator[dict], size: int) -> Iterator[list[dict]]:
    """Consecutive clips of the same shape, at most `size` at a time (stored order is kept)."""
    batch: list[dict] = []
    for c in clips:
        if batch and (len(batch) == size or c["video"].shape != batch[0]["video"].shape):
            yield batch
            batch = []
        batch.append(c)
    if batch:
        yield batch


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


def prefetched(iterable, depth: int = 8) -> Iterator:
    """Run `iterable` in a thread, `depth` items ahead: video decoding (PyAV releases the GIL)
    overlaps the encoders. Exceptions re-raise in the consumer; stopping early stops the thread."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in iterable:
                if not put(item):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(_Raised(e))
        put(end)

    thread = threading.Thread(target=work, name="precompute-decode", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def is_finished(out: OutputFolder, name: str, job: "Precompute") -> bool:
    """True when the shard and its record exist; a record from other settings is an error naming them."""
    rec = record_path(out.spec, name)
    data = out.read(os.path.basename(rec))
    if data is None or not out.exists(name):
        return False
    record = json.loads(data)
    if record.get("fingerprint") != job.fingerprint:
        theirs = record.get("settings", {})
        differ = [f"{k}: {_brief(theirs.get(k))} there, {_brief(v)} here"
                  for k, v in job.portable.items() if theirs.get(k) != v]
        what = "; ".join(differ) if differ else "VAE, text encoder, seed, clip geometry, draws or noise stream"
        raise DataError(
            f"data.latent_shards: {rec} was written with other precompute settings ({what}); "
            "write to a new directory or delete the old shards"
        )
    return True


def _brief(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def _remove_stale(out_dir: str, name: str) -> None:
    for path in glob.glob(os.path.join(glob.escape(out_dir), glob.escape(name) + ".tmp-*")):
        os.remove(path)
    rec = record_path(out_dir, name)
    for path in glob.glob(glob.escape(rec) + ".tmp-*"):
        os.remove(path)


def _expected_samples(url: str) -> int | None:
    """make_shards writes `shard-N.json` with the sample count beside each shard; used for the ETA."""
    side = url[: -len(".tar")] + ".json" if url.endswith(".tar") else None
    try:
        with open(side) as f:
            return int(json.load(f)["samples"])
    except (OSError, TypeError, ValueError, KeyError):
        return None


class ShardClips(torch.utils.data.IterableDataset):
    """This rank's unfinished input shards, decoded in `data.num_workers` DataLoader workers.

    Each shard is read whole, in stored order, by one worker (shard j goes to worker j % workers),
    so its output bytes are the same at any worker count. A worker's `BadSamples` lives in the
    worker's process, where the main process never sees it: after a shard's last clip the worker
    yields that shard's counts, and the shard's record is written from them.

    Items: {"shard": j, "clip": clip} per good clip, then {"shard": j, "bad": BadSamples.summary()}.
    """

    def __init__(self, urls: list[str], cfg: Config):
        self.urls, self.video, self.remote = urls, cfg.data.video, cfg.data.remote

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for j in range(worker, len(self.urls), workers):
            # Rejected samples are listed, not fatal: the manifest reports them and the trainer's own limit applies.
            bad = BadSamples(max_fraction=1.0, min_samples=1, keep_keys=10**9)
            for clip in iter_shard_clips(self.urls[j], self.video, bad=bad, remote_cfg=self.remote):
                yield {"shard": j, "clip": clip}
            yield {"shard": j, "bad": bad.summary()}


def decoded_shards(cfg: Config, urls: list[str]) -> Iterator[dict]:
    """`ShardClips` items of `urls`: from DataLoader workers, or from one decoding thread with none."""
    dataset = ShardClips(urls, cfg)
    workers = min(cfg.data.num_workers, len(urls))
    if workers == 0:
        return prefetched(iter(dataset))
    # The default two clips ahead per worker: a 49 x 480 x 720 clip is 200 MB of shared memory.
    return iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers))


class ShardOutput:
    """One output shard being written: same-shape clips are encoded `batch_size` at a time."""

    def __init__(self, job: Precompute, url: str, out: OutputFolder, name: str, rank: int):
        out_dir = out.local
        _remove_stale(out_dir, name)
        self.job, self.url, self.out, self.out_dir, self.name, self.rank = job, url, out, out_dir, name, rank
        self.shard = os.path.basename(url)
        self.shapes: dict[str, int] = {}
        self.pending: list[dict] = []
        self.started = time.time()
        self.writer = LatentShardWriter(os.path.join(out_dir, name))

    def add(self, clip: dict) -> int:
        """Queue a clip; returns how many clips were encoded and written by this call."""
        first = self.pending[0]["video"].shape if self.pending else None
        written = 0
        if first is not None and (len(self.pending) == self.job.pre.batch_size or clip["video"].shape != first):
            written = self._flush()
        self.pending.append(clip)
        return written

    def _flush(self) -> int:
        batch, self.pending = self.pending, []
        if not batch:
            return 0
        for s in self.job.encode(self.shard, batch):
            self.writer.write(s["key"], s["video_latents"], s["image_latents"], s["prompt_embeds"], s["meta"])
            shape = json.dumps([list(s[t].shape) for t in ("video_latents", "image_latents", "prompt_embeds")])
            self.shapes[shape] = self.shapes.get(shape, 0) + 1
        return len(batch)

    def finish(self, bad: dict) -> tuple[dict, int]:
        """Write the last batch, rename the shard into place and write its record from `bad`
        (the reading worker's `BadSamples.summary()`); returns (record, clips written now)."""
        written = self._flush()
        count = self.writer.count
        self.writer.close()
        tar = os.path.join(self.out_dir, self.name)
        record = {
            "name": self.name,
            "source": self.url,
            "samples": count,
            "empty": count == 0,
            "bytes": os.path.getsize(tar),
            "sha256": sha256_file(tar),
            "shapes": self.shapes,
            # Each sample's byte offsets: data.order=global reads remote shards by range requests.
            "index": latent_order.shard_index(tar),
            "rejected": bad["bad"],
            "rejected_by_reason": dict(bad["by_reason"]),
            "rejects": [{"shard": self.shard, **e} for e in bad["examples"]],
            "seconds": round(time.time() - self.started, 3),
            "fingerprint": self.job.fingerprint,
            "settings": self.job.portable,
            "rank": self.rank,
        }
        rec = record_path(self.out_dir, self.name)
        write_json_atomic(rec, record)
        # Remote output: the shard is uploaded before its record, so a record never names a missing shard.
        self.out.publish(self.name)
        self.out.publish(os.path.basename(rec))
        return record, written

    def abort(self) -> None:
        self.writer.abort()


def run_shards(job: Precompute, todo: list[tuple[str, str]], out: OutputFolder, progress=None, rank: int = 0) -> list[dict]:
    """Encode `todo` [(input url, output name)] and write each shard's record as it completes.

    With several workers, up to that many shards are open at once, each filled in its own order.
    """
    records: list[dict] = []
    open_: dict[int, ShardOutput] = {}
    try:
        for item in decoded_shards(job.cfg, [u for u, _ in todo]):
            j = item["shard"]
            if j not in open_:
                open_[j] = ShardOutput(job, todo[j][0], out, todo[j][1], rank)
            if "clip" in item:
                written = open_[j].add(item["clip"])
            else:
                record, written = open_.pop(j).finish(item["bad"])
                records.append(record)
            if progress is not None:
                progress.update(written)
                if "bad" in item:
                    progress.set_postfix(shards=f"{len(records)}/{len(todo)}")
    finally:
        for out in open_.values():
            out.abort()
    return records


def write_dataset_manifest(job: Precompute, urls: list[str], out: OutputFolder) -> dict | None:
    """Merge the shard records into manifest.json + rejects.jsonl once every shard is finished
    (published last to a remote folder: a reader that sees the manifest sees every shard)."""
    names = [output_name(u) for u in urls]
    if not all(is_finished(out, n, job) for n in names):
        return None
    records = [json.loads(out.read(os.path.basename(record_path(out.spec, n)))) for n in names]
    out_dir = out.local
    shapes: dict[str, int] = {}
    for r in records:
        for s, c in r["shapes"].items():
            shapes[s] = shapes.get(s, 0) + c
    by_reason = sum_by_reason(r["rejected_by_reason"] for r in records)
    rejects = os.path.join(out_dir, REJECTS_FILE)
    tmp = f"{rejects}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        for r in records:
            for item in r["rejects"]:
                f.write(json.dumps(item, sort_keys=True) + "\n")
    os.replace(tmp, rejects)
    out.publish(REJECTS_FILE)
    manifest = {
        **{k: v for k, v in job.settings.items()},
        "source": job.cfg.data.video_shards,
        "samples": sum(r["samples"] for r in records),
        "rejected": sum(r["rejected"] for r in records),
        "rejected_by_reason": by_reason,
        "empty_shards": [r["name"] for r in records if r["empty"]],
        "shapes": [{"video_latents": json.loads(s)[0], "image_latents": json.loads(s)[1],
                    "prompt_embeds": json.loads(s)[2], "samples": c} for s, c in sorted(shapes.items())],
        "shards": [{k: r[k] for k in ("name", "source", "samples", "empty", "bytes", "sha256", "rejected", "index")
                    if k in r} for r in records],
        "empty_prompt": "empty_prompt.safetensors",
        "fingerprint": job.fingerprint,
    }
    write_manifest(out_dir, manifest)
    out.publish(MANIFEST_FILE)
    return manifest


def _reasons(by_reason: dict[str, int]) -> str:
    return f" ({', '.join(f'{r}: {n}' for r, n in sorted(by_reason.items()))})" if by_reason else ""


def summary_lines(s: dict) -> list[str]:
    """What the launcher prints: this rank's shards, then the whole dataset's totals once complete."""
    lines = [f"[rank {s['rank']}/{s['world']}] {s['written']} shard(s) written ({s['samples']} clips, "
             f"{s['rejected']} rejected{_reasons(s['rejected_by_reason'])}), {s['skipped']} already finished "
             f"-> {s['output']}"]
    m = s["manifest"]
    if m is not None:
        empty = f", {len(m['empty_shards'])} empty shard(s)" if m["empty_shards"] else ""
        lines.append(f"dataset complete: {m['samples']} clips in {len(m['shards'])} shard(s), {m['rejected']} rejected"
                     f"{_reasons(m['rejected_by_reason'])}{empty}; see {s['output']}/manifest.json and rejects.jsonl")
    return lines


def run(cfg: Config, rank: int = 0, world: int = 1, device: str | None = None, progress: bool = True) -> dict:
    """The whole job for one rank. Returns a summary (with the manifest if this rank wrote it)."""
    if not cfg.data.video_shards:
        raise ConfigError("data.video_shards: required by the precompute job (a directory, .tar path or pattern)")
    out_dir = cfg.data.latent_shards
    if "{" in out_dir or out_dir.endswith(".tar") or ("://" in out_dir and not out_dir.startswith("s3://")) \
            or out_dir.startswith("pipe:"):
        raise ConfigError(f"data.latent_shards: is {out_dir!r}; the precompute job writes to a local directory "
                          "or an s3://bucket/prefix")
    urls = expand_shards(cfg.data.video_shards, key="data.video_shards", allow_pipe=cfg.data.allow_pipe,
                         remote_cfg=cfg.data.remote)
    if os.path.isdir(cfg.data.video_shards) and os.path.realpath(cfg.data.video_shards) == os.path.realpath(out_dir):
        raise ConfigError("data.latent_shards: must be a different directory from data.video_shards")
    if not out_dir.startswith("s3://") and os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"data.latent_shards: {out_dir}: a file exists and is not a directory")
    if device is None:
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    # The output folder is made only once the inputs are listed and the encoders are built: a
    # config or encoder error must not leave an empty folder behind.
    job = Precompute(cfg, device)
    empty_prompt = job.empty_prompt()
    out = OutputFolder(out_dir, cfg.data.remote)  # s3://: staged in a local temporary folder, then uploaded
    if out.remote:
        shutil.rmtree(out.local, ignore_errors=True)  # what a killed run of this rank left there
    os.makedirs(out.local, exist_ok=True)
    save_empty_prompt(out.local, empty_prompt)
    out.publish(EMPTY_PROMPT_FILE)

    mine = assignment(urls, rank, world)
    todo = [(u, n) for u, n in mine if not is_finished(out, n, job)]
    expected = [_expected_samples(u) for u, _ in todo]
    total = sum(expected) if all(e is not None for e in expected) else None
    bar = tqdm(total=total, unit="clip", desc=f"precompute rank {rank}", disable=not progress or rank != 0,
               dynamic_ncols=True, file=sys.stderr)
    done = run_shards(job, todo, out, bar, rank)
    bar.close()
    manifest = write_dataset_manifest(job, urls, out)
    if out.remote:
        shutil.rmtree(out.local, ignore_errors=True)
    return {
        "rank": rank,
        "world": world,
        "assigned": len(mine),
        "skipped": len(mine) - len(todo),
        "written": len(done),
        "samples": sum(r["samples"] for r in done),
        "rejected": sum(r["rejected"] for r in done),
        "rejected_by_reason": sum_by_reason(r["rejected_by_reason"] for r in done),
        "manifest": manifest,
        "output": out_dir,
    }
