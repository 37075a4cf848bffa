"""A global sample order for latent shards that does not depend on ranks or workers.

The dataset is indexed once: every sample's shard, byte range and tensor shapes (read from the
safetensors header, 8 bytes plus a small JSON, without loading the tensors). Epoch e's order is a
list of *global micro-batches*: samples of one shape, permuted with a generator keyed by
(seed, e), cut into micro-batches, and the micro-batches permuted again. The global sequence
is a function of (seed, epoch, micro-batch index) only. Rank r of W takes global micro-batches
r, r + W, r + 2W, ...: at any world size or worker count the same micro-batches are trained, in
the same global order, and a run that has consumed G of them resumes at G exactly.

Remote shards (http(s)://, s3://) are indexed from their manifest.json, where the precompute job
records each sample's byte offsets (`shard_index`), and read by byte ranges (`read_members`).
"""

from __future__ import annotations

import json
import os
import struct
import tarfile
from dataclasses import dataclass

import torch

from i2v.core import seeding
from i2v.core.errors import DataError


@dataclass(frozen=True)
class Entry:
    shard: str
    key: str
    latents: tuple[int, int] | None  # (byte offset, size) of {key}.latents.safetensors
    meta: tuple[int, int] | None  # (byte offset, size) of {key}.json
    shape: tuple | None  # (video_latents shape, prompt_embeds shape); None if the header is unreadable


def is_local(urls: list[str]) -> bool:
    return all(os.path.isfile(u) for u in urls)


def resolve_order(order: str, urls: list[str], key: str = "data.latent_shards") -> str:
    """`data.order` made concrete: auto means global for local files, stream otherwise. Global over
    http(s):// or s3:// shards is asked for by name: it reads the sample offsets of the shards'
    manifest.json (see `index_from_manifest`)."""
    from i2v.data import remote

    if order == "auto":
        return "global" if is_local(urls) else "stream"
    if order == "global" and not is_local(urls) and not all(remote.is_remote(u) for u in urls):
        raise DataError(f"{key}: the global sample order needs local shard files, or http(s):// or s3:// shards "
                        "with a manifest.json of sample offsets; use data.order=stream for these URLs")
    return order


def _safetensors_shapes(f, offset: int, size: int) -> tuple | None:
    """(video_latents shape, prompt_embeds shape) from the header alone, or None."""
    if size < 8:
        return None
    f.seek(offset)
    (n,) = struct.unpack("<Q", f.read(8))
    if n > min(size - 8, 1 << 20):
        return None
    try:
        header = json.loads(f.read(n))
        return tuple(header["video_latents"]["shape"]), tuple(header["prompt_embeds"]["shape"])
    except (ValueError, KeyError, TypeError):
        return None


TRUNCATED = "truncated shard"
UNREADABLE = "unreadable shard"


def scan_tar(path: str) -> tuple[list[tarfile.TarInfo], tuple[str, str] | None]:
    """The complete file members of a local tar, from its headers alone, and what is wrong with it:
    None, or (reason, detail) with reason TRUNCATED (the file stops before its end-of-archive
    marker: a copy or write cut short) or UNREADABLE (not a tar, or a damaged header).

    tarfile raises for a cut inside a member but stops quietly at a cut between members, or at a
    damaged header after the first, as if the archive ended there: the end marker (a zero block,
    which every tar writer puts after the last member) tells those apart from a complete file.
    """
    size = os.path.getsize(path)
    members: list[tarfile.TarInfo] = []
    problem = None
    try:
        with tarfile.open(path, "r:") as tar:
            try:
                for m in tar:  # headers only: tarfile seeks past the data of each member
                    members.append(m)
                end = tar.offset
            except tarfile.ReadError as e:
                end, problem = None, (TRUNCATED if "unexpected end" in str(e) else UNREADABLE, str(e))
    except (tarfile.ReadError, OSError) as e:
        return [], (UNREADABLE, f"not a readable tar file: {e}")
    if problem is None:
        with open(path, "rb") as f:
            f.seek(end)
            block = f.read(tarfile.BLOCKSIZE)
        if len(block) < tarfile.BLOCKSIZE:
            problem = (TRUNCATED, f"the file ends at byte {size} with no end-of-archive marker")
        elif block.count(0) != len(block):
            problem = (UNREADABLE, f"damaged member header at byte {end}")
    complete = [m for m in members if m.offset_data + m.size <= size]
    if problem and problem[0] == TRUNCATED and len(complete) < len(members):
        problem = (TRUNCATED, f"the file ends at byte {size}, inside {members[-1].name}")
    if problem:
        samples = len({os.path.basename(m.name).partition(".")[0] for m in complete if m.isfile()})
        problem = (problem[0], problem[1] + f"; the {samples} sample(s) before it are used")
    return complete, problem


def index_shards(urls: list[str]) -> tuple[list[Entry], list[tuple[str, str, str]]]:
    """One entry per sample key, shards in the given order, members in stored order; and the shards
    that could not be read to their end, as (path, reason, detail)."""
    entries: list[Entry] = []
    bad: list[tuple[str, str, str]] = []
    for url in urls:
        found, problem = scan_tar(url)
        if problem:
            bad.append((url, *problem))
        members: dict[str, dict] = {}
        for m in found:
            if not m.isfile():
                continue
            base = os.path.basename(m.name)
            key, _, ext = base.partition(".")
            members.setdefault(key, {})[ext] = (m.offset_data, m.size)
        with open(url, "rb") as f:
            for key, parts in members.items():
                lat = parts.get("latents.safetensors")
                shape = _safetensors_shapes(f, *lat) if lat else None
                entries.append(Entry(url, key, lat, parts.get("json"), shape))
    return entries, bad


def shard_index(path: str) -> list[list]:
    """One local shard's samples as the manifest records them, for range reads from object storage:
    [key, latents offset, latents size, json offset, json size, video_latents shape, prompt_embeds shape]."""
    entries, _ = index_shards([path])
    return [[e.key, *(e.latents or (None, None)), *(e.meta or (None, None)),
             *([list(e.shape[0]), list(e.shape[1])] if e.shape else [None, None])] for e in entries]


def index_from_manifest(urls: list[str], manifest: dict | None, where: str, key: str = "data.latent_shards") -> list[Entry]:
    """The index of remote shards from the per-sample offsets their manifest records (`shard_index`)."""
    by_name = {s.get("name"): s for s in (manifest or {}).get("shards", [])}
    entries: list[Entry] = []
    for url in urls:
        shard = by_name.get(os.path.basename(url))
        if shard is None or "index" not in shard:
            what = "no manifest" if manifest is None else f"no sample offsets for {os.path.basename(url)} in it"
            raise DataError(f"{key}: data.order=global over URLs reads the samples' byte offsets from {where}: "
                            f"{what} (precompute writes them); use data.order=stream")
        for k, lo, ls, mo, ms, vshape, pshape in shard["index"]:
            entries.append(Entry(url, k, (lo, ls) if lo is not None else None, (mo, ms) if mo is not None else None,
                                 (tuple(vshape), tuple(pshape)) if vshape is not None else None))
    return entries


def epoch_batches(index: list[Entry], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Epoch `epoch`'s global micro-batches (lists of index positions), each of one shape.

    Samples whose header could not be read form their own group; they are reported as bad when read.
    A shape group's last partial micro-batch is left out of this epoch (a different one each epoch).
    """
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(index):
        groups.setdefault(repr(e.shape), []).append(i)
    gen = seeding.generator("latent-order", seed, epoch)
    batches: list[list[int]] = []
    for name in sorted(groups):
        members = groups[name]
        perm = torch.randperm(len(members), generator=gen).tolist()
        full = len(members) // batch_size * batch_size
        batches += [[members[p] for p in perm[i : i + batch_size]] for i in range(0, full, batch_size)]
    order = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in order]


def read_members(entries: list[Entry], remote_cfg=None) -> list:
    """The raw members of each entry (as `read_member`), or the OSError that stopped it. Remote shards
    are read by range requests, one per run of neighbouring samples of a shard (remote.read_ranges)."""
    from i2v.data import remote

    out: list = [None] * len(entries)
    by_shard: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        by_shard.setdefault(e.shard, []).append(i)
    for shard, idx in by_shard.items():
        if not remote.is_remote(shard):
            for i in idx:
                try:
                    out[i] = read_member(entries[i])
                except OSError as e:
                    out[i] = e
            continue
        parts = [(i, ext, where) for i in idx for ext, where in (("latents.safetensors", entries[i].latents),
                                                                  ("json", entries[i].meta)) if where is not None]
        try:
            data = remote.read_ranges(shard, [where for _, _, where in parts], remote_cfg)
        except OSError as e:
            for i in idx:
                out[i] = e
            continue
        for i in idx:
            out[i] = {"__key__": entries[i].key, "__url__": shard}
        for (i, ext, _), blob in zip(parts, data):
            out[i][ext] = blob
    return out


def read_member(entry: Entry) -> dict:
    """The raw members of one sample, in the form webdataset produces (for `decode_latent_sample`)."""
    sample = {"__key__": entry.key, "__url__": entry.shard}
    with open(entry.shard, "rb") as f:
        for ext, where in (("latents.safetensors", entry.latents), ("json", entry.meta)):
            if where is not None:
                f.seek(where[0])
                sample[ext] = f.read(where[1])
    return sample
