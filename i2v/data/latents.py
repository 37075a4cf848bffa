"""Latent shards: the format shared by the precompute job (writer) and the trainer (reader).

A latent shard is a WebDataset tar. Each sample has two members:

- `{key}.latents.safetensors` with
  - `video_latents` [F, C, h, w]: VAE latents, frames first as the transformer takes them, already
    multiplied by the VAE scaling factor;
  - `image_latents` [K, 1, C, h, w]: K draws of vae.encode(frame0 + sigma * eps) * scaling_factor
    (the first frame plus a little noise, never noise alone);
  - `prompt_embeds` [L, D]: the text encoder's output, padded/truncated to L tokens.
- `{key}.json`: metadata (source key, frames, fps, size, scaling factor, sigmas, encoder identity).

Beside the shards, `empty_prompt.safetensors` holds the empty prompt's embedding once (for
classifier-free-guidance dropout) and `manifest.json` describes the dataset. Nothing is pickled.

The reader is a list of small generator stages: shard list -> per-(rank, worker) split ->
tar members -> decode + validate -> seeded shuffle buffer -> pick one image draw ->
same-shape batches. Bad samples are counted by reason and named by `__key__`; a shard that is not
a tar or was cut short is counted too, named by its path, and its complete samples are still read.
Shards behind http(s):// and s3:// URLs are read through `i2v.data.remote`, which resumes a broken
connection at the byte it reached and counts a missing or denied shard by URL and reason.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import sys
import tarfile
import time
from typing import Iterator

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.torch import load_file, save_file

from i2v.config import RemoteConfig
from i2v.data import latent_order, remote
from i2v.data.shards import BadSamples, expand_shards, grouped, shuffle_buffer, split_for
from i2v.core import seeding
from i2v.core.errors import DataError
from i2v.core.fsutil import write_json_atomic

TENSORS = ("video_latents", "image_latents", "prompt_embeds")
EMPTY_PROMPT_FILE = "empty_prompt.safetensors"
MANIFEST_FILE = "manifest.json"


# --------------------------------------------------------------------------- writing


class LatentShardWriter:
    """Writes one latent shard atomically: to `path.tmp-<pid>`, renamed to `path` on a clean close.

    A crash or exception leaves no file at `path`, so a later run never reads a partial shard.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.tmp = f"{self.path}.tmp-{os.getpid()}"
        self.count = 0
        self._tar = tarfile.open(self.tmp, "w")

    def write(self, key: str, video_latents, image_latents, prompt_embeds, meta: dict | None = None) -> None:
        check_sample_shapes(key, video_latents, image_latents, prompt_embeds)
        tensors = {
            "video_latents": video_latents.detach().contiguous().cpu(),
            "image_latents": image_latents.detach().contiguous().cpu(),
            "prompt_embeds": prompt_embeds.detach().contiguous().cpu(),
        }
        self._add(f"{key}.latents.safetensors", st_save(tensors))
        self._add(f"{key}.json", json.dumps(meta or {}, sort_keys=True).encode())
        self.count += 1

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0  # byte-identical shards on rerun
        self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self._tar.close()
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self._tar.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)

    def __enter__(self) -> "LatentShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def save_empty_prompt(directory: str | os.PathLike, prompt_embeds: torch.Tensor) -> str:
    path = os.path.join(directory, EMPTY_PROMPT_FILE)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({"prompt_embeds": prompt_embeds.detach().contiguous().cpu()}, tmp)
    os.replace(tmp, path)
    return path


def load_empty_prompt(spec: str, remote_cfg: RemoteConfig | None = None) -> torch.Tensor | None:
    """The dataset's empty-prompt embedding [L, D], if the shard directory (or URL folder) holds one."""
    if remote.is_remote(spec):
        data = remote.read_object(f"{remote.parent_url(spec)}/{EMPTY_PROMPT_FILE}", remote_cfg)
        return None if data is None else st_load(data)["prompt_embeds"]
    directory = spec if os.path.isdir(spec) else os.path.dirname(spec.split("{")[0])
    path = os.path.join(directory, EMPTY_PROMPT_FILE)
    if not os.path.isfile(path):
        return None
    return load_file(path)["prompt_embeds"]


def check_sample_shapes(key: str, video_latents, image_latents, prompt_embeds) -> None:
    """Raise DataError naming `key` unless the three tensors have the documented layout."""
    if video_latents.dim() != 4:
        raise DataError(f"{key}: video_latents must be [F, C, h, w], got shape {tuple(video_latents.shape)}")
    if image_latents.dim() != 5 or image_latents.shape[1] != 1:
        raise DataError(f"{key}: image_latents must be [K, 1, C, h, w], got shape {tuple(image_latents.shape)}")
    if tuple(image_latents.shape[2:]) != tuple(video_latents.shape[1:]):
        raise DataError(
            f"{key}: image_latents {tuple(image_latents.shape)} do not match video_latents "
            f"{tuple(video_latents.shape)} in [C, h, w]"
        )
    if prompt_embeds.dim() != 2:
        raise DataError(f"{key}: prompt_embeds must be [L, D], got shape {tuple(prompt_embeds.shape)}")


# --------------------------------------------------------------------------- reading


class _Bad(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def decode_latent_sample(sample: dict, expect: dict | None = None) -> dict:
    """Raw tar sample -> tensors and metadata; raises `_Bad(reason)` for a sample to skip."""
    if "latents.safetensors" not in sample:
        raise _Bad("missing key", f"no .latents.safetensors member (has {sorted(k for k in sample if not k.startswith('_'))})")
    try:
        tensors = st_load(sample["latents.safetensors"])
    except Exception as e:  # safetensors raises several types for damaged bytes
        raise _Bad("undecodable", str(e)[:200]) from None
    missing = [t for t in TENSORS if t not in tensors]
    if missing:
        raise _Bad("missing key", f"no tensor {missing[0]!r} in latents.safetensors")
    key = sample.get("__key__", "?")
    try:
        check_sample_shapes(key, *(tensors[t] for t in TENSORS))
    except DataError as e:
        raise _Bad("wrong shape", str(e)) from None
    if expect:
        v, p = tensors["video_latents"], tensors["prompt_embeds"]
        if "channels" in expect and v.shape[1] != expect["channels"]:
            raise _Bad("wrong shape", f"video_latents has {v.shape[1]} channels, the model takes {expect['channels']}")
        if "text_dim" in expect and p.shape[1] != expect["text_dim"]:
            raise _Bad("wrong shape", f"prompt_embeds dim {p.shape[1]}, the model takes {expect['text_dim']}")
        if "text_len" in expect and p.shape[0] != expect["text_len"]:
            raise _Bad("wrong shape", f"prompt_embeds length {p.shape[0]}, the model takes {expect['text_len']}")
    for name in TENSORS:
        if not torch.isfinite(tensors[name]).all():
            raise _Bad("non-finite", f"{name} holds NaN or Inf")
    meta = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError as e:
            raise _Bad("undecodable", f"bad json: {e}") from None
    return {"__key__": key, "__url__": sample.get("__url__", ""), **tensors, "meta": meta}


def _shard_problem(exn: BaseException) -> tuple[str, str]:
    """(reason, detail) of a shard that failed while webdataset streamed it."""
    # webdataset appends " @ <file object>" and the url to the message; the url is named by the caller.
    if isinstance(exn, remote.RemoteError):  # missing, denied, unreachable or retried out: said as such
        return exn.reason, exn.detail[:300]
    message = str(exn.args[0]).split(" @ ")[0] if exn.args else str(exn)
    cut = isinstance(exn, EOFError) or "unexpected end" in message or "truncated" in message
    return (latent_order.TRUNCATED if cut else latent_order.UNREADABLE), f"{type(exn).__name__}: {message}"[:200]


class LatentDataset(torch.utils.data.IterableDataset):
    """Same-shape batches of latent samples for one rank, in one of two orders.

    `order="global"` (local shard files, or http(s)/s3 shards indexed by their manifest.json): the
    global micro-batch sequence is a function of (seed, epoch, index) only (see `latent_order`); rank
    r takes every world_size-th micro-batch from position `start_global + r`. The order is the same at
    any world size or worker count, and a resume starts at its position without reading what came
    before. Remote samples are read by byte ranges (`latent_order.read_members`).

    `order="stream"` (any source, e.g. remote URLs): each (rank, worker) slot streams its own
    shards (disjoint across slots in an epoch); with `resampled`, shards are drawn with replacement
    forever. Choices are seeded from (seed, rank, worker, epoch); `start_batch` replays and drops
    the batches a resumed run has already trained on. `order="auto"` picks global for local files.
    """

    def __init__(
        self,
        shards: str,
        *,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 64,
        resampled: bool = True,
        max_bad_fraction: float = 0.05,
        min_samples_for_bad_check: int = 20,
        expect: dict | None = None,
        start_batch: int = 0,
        start_global: int = 0,
        num_workers: int = 0,
        allow_pipe: bool = False,
        order: str = "auto",
        key: str = "data.latent_shards",
        remote_cfg: RemoteConfig | None = None,
    ):
        super().__init__()
        self.remote_cfg = remote_cfg or RemoteConfig()
        self.urls = expand_shards(shards, key=key, allow_pipe=allow_pipe, remote_cfg=self.remote_cfg)
        self.order = order = latent_order.resolve_order(order, self.urls, key)
        self.start_global = start_global
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.seed = batch_size, seed
        self.shuffle_buffer, self.resampled = shuffle_buffer, resampled
        self.max_bad_fraction, self.min_samples = max_bad_fraction, min_samples_for_bad_check
        self.expect = expect
        self.start_batch = start_batch
        self.num_workers = num_workers
        self.bad_shards: list[tuple[str, str, str]] = []  # (path, reason, detail) found by the index
        if order == "global" and not latent_order.is_local(self.urls):  # remote: offsets from the manifest
            where = f"{remote.parent_url(shards if isinstance(shards, str) else shards[0])}/{MANIFEST_FILE}"
            data = remote.read_object(where, self.remote_cfg)
            manifest = json.loads(data) if data is not None else None
            self.index = latent_order.index_from_manifest(self.urls, manifest, where, key)
        elif order == "global":
            self.index, self.bad_shards = latent_order.index_shards(self.urls)
        if order == "global":
            self.batches_per_epoch = len(latent_order.epoch_batches(self.index, batch_size, seed, 0))
            named = "; ".join(f"{p}: {r} ({d})" for p, r, d in self.bad_shards)
            if self.batches_per_epoch == 0:
                raise DataError(f"{key}: {len(self.index)} sample(s) cannot make one micro-batch of {batch_size} "
                                "same-shape samples" + (f"; bad shards: {named}" if named else ""))
            if self.bad_shards and rank == 0:
                # Said once at startup; the counts and the max_bad_fraction stop follow as the shards are read.
                print(f"warning: {key}: {len(self.bad_shards)} bad shard(s), each counted as one bad sample "
                      f"per epoch: {named}", file=sys.stderr, flush=True)
        else:
            # Fail now, in the main process, if some reader slot would get no shard.
            split_for(self.urls, rank, world_size, 0, num_workers)

    # -- stages --------------------------------------------------------------

    def _shard_stream(self, worker: int, workers: int, rng: random.Random) -> Iterator[tuple[int, str]]:
        mine = split_for(self.urls, self.rank, self.world_size, worker, workers)
        epoch = 0
        while True:
            if self.resampled:
                yield epoch, rng.choice(mine)
                continue
            for url in seeding.shuffled(mine, "shard-order", self.seed, epoch, self.rank, worker):
                yield epoch, url
            epoch += 1

    def _samples(self, shard_stream, bad: BadSamples) -> Iterator[dict]:
        scanned: dict[str, tuple[str, str] | None] = {}  # local shard -> what is wrong with it, looked at once
        warned: set[str] = set()  # remote shards said to be bad on stderr, once each
        for epoch, url in shard_stream:
            # tarfile ends a local shard cut between members quietly; its headers tell (see scan_tar).
            if url not in scanned and os.path.isfile(url):
                scanned[url] = latent_order.scan_tar(url)[1]
            problem = scanned.get(url)
            if problem is not None:
                bad.add_bad(url, *problem)
            # webdataset reports one failure at several stages: a shard counts once per read.
            counted = [problem is not None]

            def handler(exn, url=url, counted=counted):
                if not counted[0]:
                    counted[0] = True
                    if isinstance(exn, remote.RemoteError) and url not in warned:
                        warned.add(url)
                        print(f"warning: data.latent_shards: {exn}; counted as a bad read (data.max_bad_fraction)",
                              file=sys.stderr, flush=True)
                    bad.add_bad(url, *_shard_problem(exn))
                return True  # skip the rest of this shard, keep training

            raw = remote.tar_samples([{"url": url}], handler, self.remote_cfg)
            for sample in raw:
                try:
                    out = decode_latent_sample(sample, self.expect)
                except _Bad as b:
                    bad.add_bad(f"{os.path.basename(url)}:{sample.get('__key__', '?')}", b.reason, b.detail)
                    continue
                bad.add_good()
                out["epoch"] = epoch
                yield out

    @staticmethod
    def _pick_draw(samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        # One of the K cached noisy image draws per step keeps the conditioning augmentation alive.
        for s in samples:
            k = rng.randrange(s["image_latents"].shape[0])
            s["image_latents"] = s["image_latents"][k]  # [1, C, h, w]
            s["draw"] = k
            yield s

    def _batches(self, samples: Iterator[dict]) -> Iterator[dict]:
        # Group by shape so every batch stacks: clips of different sizes never mix.
        for group in grouped(samples, self.batch_size, _shapes):
            yield collate(group)

    def _global_batches(self, worker: int, workers: int) -> Iterator[dict]:
        bad = BadSamples(self.max_bad_fraction, self.min_samples)
        cache: dict[int, list[list[int]]] = {}
        # A DataLoader hands out worker batches round-robin from worker 0: worker w makes this
        # rank's micro-batches w, w + workers, ... and the loader yields them in order.
        local = worker
        while True:
            position = self.start_global + local * self.world_size + self.rank
            epoch, j = divmod(position, self.batches_per_epoch)
            if epoch not in cache:
                cache.clear()
                cache[epoch] = latent_order.epoch_batches(self.index, self.batch_size, self.seed, epoch)
            if j == 0:
                # A bad shard counts once an epoch, like the samples it held would have been read; the
                # reader of the epoch's first micro-batch counts it, so it counts once across all readers.
                for path, reason, detail in self.bad_shards:
                    bad.add_bad(path, reason, detail)
            samples = []
            raws = latent_order.read_members([self.index[i] for i in cache[epoch][j]], self.remote_cfg)
            for i, raw in zip(cache[epoch][j], raws):
                entry = self.index[i]
                try:
                    if isinstance(raw, OSError):
                        raise raw
                    s = decode_latent_sample(raw, self.expect)
                except remote.RemoteError as e:
                    bad.add_bad(f"{entry.shard}:{entry.key}", e.reason, e.detail[:300])
                    continue
                except OSError as e:  # the shard went away or broke after it was indexed
                    bad.add_bad(f"{entry.shard}:{entry.key}", latent_order.UNREADABLE, str(e)[:200])
                    continue
                except _Bad as b:
                    bad.add_bad(f"{os.path.basename(entry.shard)}:{entry.key}", b.reason, b.detail)
                    continue
                bad.add_good()
                # The image draw is keyed by (seed, global position, sample), like everything else here.
                k = seeding.rng("draw", self.seed, position, i).randrange(s["image_latents"].shape[0])
                s["image_latents"], s["draw"], s["epoch"] = s["image_latents"][k], k, epoch
                samples.append(s)
            # A micro-batch whose samples were all bad still takes its turn, so positions stay aligned.
            batch = collate(samples) if samples else {"empty": True}
            batch["position"] = position
            batch["bad"] = {"worker": worker, "good": bad.good, "by_reason": dict(bad.by_reason),
                            "remote_retries": remote.retry_count()}
            yield batch
            local += workers

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.order == "global":
            yield from self._global_batches(worker, workers)
            return
        # A DataLoader hands out worker batches round-robin starting at worker 0. After a resume at
        # batch `start_batch`, the next batch belongs to stream start_batch % workers, so loader
        # worker w replays stream (w + start_batch) % workers.
        worker = (worker + self.start_batch) % workers
        rng = seeding.rng("latents", self.seed, self.rank, worker)
        bad = BadSamples(self.max_bad_fraction, self.min_samples)
        stream = self._shard_stream(worker, workers, rng)
        stream = self._samples(stream, bad)
        stream = shuffle_buffer(stream, self.shuffle_buffer, rng)
        stream = self._pick_draw(stream, rng)
        # This stream's share of the batches already consumed: every workers-th one from its index.
        skip = len(range(worker, self.start_batch, workers))
        for i, batch in enumerate(self._batches(stream)):
            if i < skip:
                continue
            batch["bad"] = {"worker": worker, "good": bad.good, "by_reason": dict(bad.by_reason),
                            "remote_retries": remote.retry_count()}
            yield batch


def _shapes(sample: dict) -> tuple:
    return tuple(sample["video_latents"].shape), tuple(sample["prompt_embeds"].shape)


def collate(samples: list[dict]) -> dict:
    return {
        "video_latents": torch.stack([s["video_latents"] for s in samples]),
        "image_latents": torch.stack([s["image_latents"] for s in samples]),
        "prompt_embeds": torch.stack([s["prompt_embeds"] for s in samples]),
        "keys": [s["__key__"] for s in samples],
        "draws": [s["draw"] for s in samples],
        "epochs": [s["epoch"] for s in samples],
        "meta": [s["meta"] for s in samples],
    }


def _ignore_ctrl_c(worker_id: int) -> None:
    # A terminal's Ctrl-C reaches the workers too. The trainer stops at a step boundary after a commit,
    # which may need micro-batches still to be read: the workers keep serving until the loader ends them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset: LatentDataset, num_workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,  # the dataset batches by shape itself
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
        worker_init_fn=_ignore_ctrl_c if num_workers > 0 else None,
    )


def write_manifest(directory: str | os.PathLike, manifest: dict) -> str:
    path = os.path.join(directory, MANIFEST_FILE)
    write_json_atomic(path, {**manifest, "written_at": time.time()}, indent=2)
    return path
