"""Pack videos and captions into WebDataset shards in the video2dataset layout.

Inputs: a folder of videos with sidecar captions (clip.mp4 + clip.txt, searched
recursively), or a CSV (header with `path` and `caption` columns) or JSONL
({"path": ..., "caption": ...} per line) list; relative paths are relative to the list.
An empty or whitespace-only caption is rejected (`empty caption`) unless
`allow_empty_captions`, which stores it as "" (precompute encodes it as the empty prompt).

Output, in one folder::

    shard-000000.tar     {key}.mp4 (original bytes), {key}.txt (caption), {key}.json (probe)
    shard-000000.json    that shard's inputs, counts and rejects (the resume record)
    manifest.json        all shards with sample counts, total frames and hours
    rejects.jsonl        one line per rejected input: {"path", "reason", "detail"}

Keys are the input's position in the sorted input list (9 digits, as video2dataset
does), so reruns over the same inputs give the same keys and the same shards. Each shard
is written to a temporary name and renamed when complete; a rerun keeps every shard whose
record lists the same inputs (absolute paths, so a rerun from another working directory
matches), captions and settings, and redoes the rest.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import io
import json
import multiprocessing
import os
import tarfile

from tqdm import tqdm

from i2v.data.videos import VIDEO_EXTS, BadSample
from i2v.data_prep.probe import probe_file
from i2v.core.errors import DataError
from i2v.core.fsutil import write_text_atomic

MISSING = "missing"
NO_CAPTION = "no caption"
EMPTY_CAPTION = "empty caption"


@dataclasses.dataclass
class Item:
    index: int
    path: str
    caption: str | None

    @property
    def key(self) -> str:
        return f"{self.index:09d}"


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


# --------------------------------------------------------------------------- inputs


def list_inputs(spec: str) -> list[Item]:
    """Items in a stable order: sorted folder paths, or the list's own order."""
    if not os.path.exists(spec):
        raise DataError(f"--input: path not found: {spec}")
    if os.path.isdir(spec):
        pairs = _folder(spec)
    elif spec.lower().endswith(".csv"):
        pairs = _csv(spec)
    elif spec.lower().endswith((".jsonl", ".json")):
        pairs = _jsonl(spec)
    else:
        raise DataError(f"--input: {spec} is neither a folder nor a .csv or .jsonl list")
    if not pairs:
        raise DataError(f"--input: no videos found in {spec} (extensions: {', '.join(VIDEO_EXTS)})")
    return [Item(i, p, c) for i, (p, c) in enumerate(pairs)]


def _folder(root: str) -> list[tuple[str, str | None]]:
    # Absolute paths: the shard records compare them, and a rerun from another working
    # directory must find its shards finished.
    found = []
    for d, dirs, files in os.walk(os.path.abspath(root)):
        dirs.sort()
        for name in sorted(files):
            if name.rsplit(".", 1)[-1].lower() in VIDEO_EXTS and "." in name:
                path = os.path.join(d, name)
                side = os.path.splitext(path)[0] + ".txt"
                found.append((path, _read_text(side) if os.path.isfile(side) else None))
    return found


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read().strip()


def _csv(path: str) -> list[tuple[str, str | None]]:
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows and ("path" not in rows[0] or "caption" not in rows[0]):
        raise DataError(f"--input: {path} needs a header with 'path' and 'caption' columns, has {list(rows[0])}")
    return [(os.path.abspath(os.path.join(base, r["path"])), r["caption"]) for r in rows if r.get("path")]


def _jsonl(path: str) -> list[tuple[str, str | None]]:
    base = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out.append((os.path.abspath(os.path.join(base, row["path"])), row.get("caption")))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"--input: {path}:{n}: expected {{\"path\": ..., \"caption\": ...}} ({e})") from None
            if not isinstance(out[-1][1], (str, type(None))):
                raise DataError(f"--input: {path}:{n}: caption must be a string, got {type(out[-1][1]).__name__}")
    return out


# --------------------------------------------------------------------------- one input


def examine(args: tuple[Item, int, bool]) -> tuple[Item, dict | None, bytes | None, tuple[str, str] | None]:
    """Worker: (item, metadata, bytes, None) or (item, None, None, (reason, detail))."""
    item, min_frames, allow_empty_captions = args
    if not os.path.isfile(item.path):
        return item, None, None, (MISSING, "file not found")
    if item.caption is None:
        return item, None, None, (NO_CAPTION, "no sidecar .txt beside the video")
    if not item.caption.strip() and not allow_empty_captions:
        return item, None, None, (EMPTY_CAPTION, "the caption is empty or whitespace; pass --allow-empty-captions "
                                                 "to keep such clips (trained as the empty prompt)")
    try:
        meta, data = probe_file(item.path, min_frames=min_frames)
    except BadSample as e:
        return item, None, None, (e.reason, e.detail)
    except OSError as e:
        return item, None, None, ("unreadable", str(e))
    return item, meta, data, None


# --------------------------------------------------------------------------- writing


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed owner and time so the same inputs give byte-identical shards.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shard(out_dir: str, shard: int, results: list, settings: dict) -> dict:
    """Write one shard (temp name, then rename) and its record; returns the record."""
    record = {"shard": shard_name(shard), "inputs": [], "captions_sha256": captions_sha256([r[0] for r in results]),
              "settings": settings, "samples": 0, "frames": 0, "seconds": 0.0, "rejects": []}
    tar_path = os.path.join(out_dir, shard_name(shard))
    for stale in glob.glob(glob.escape(tar_path) + ".tmp*"):
        os.remove(stale)  # left by an interrupted run; one writer per output folder is assumed
    tmp = f"{tar_path}.tmp{os.getpid()}"
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for item, meta, data, reject in results:
            record["inputs"].append(item.path)
            if reject is not None:
                record["rejects"].append({"path": item.path, "key": item.key, "reason": reject[0], "detail": reject[1]})
                continue
            ext = os.path.splitext(item.path)[1].lstrip(".").lower()
            _add(tar, f"{item.key}.{ext}", data)
            # A blank caption kept by --allow-empty-captions is stored as "", exactly the empty prompt.
            caption = item.caption if item.caption.strip() else ""
            _add(tar, f"{item.key}.txt", caption.encode("utf-8"))
            _add(tar, f"{item.key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
            record["samples"] += 1
            record["frames"] += meta["frames"]
            record["seconds"] += meta["duration"]
    # The record goes first: a shard counts as finished only once its tar is in place.
    write_text_atomic(tar_path[:-4] + ".json", json.dumps(record, indent=1))
    if record["samples"]:
        os.replace(tmp, tar_path)
    else:
        os.remove(tmp)  # an empty tar would leave a reader with nothing to read
    return record


def captions_sha256(items: list[Item]) -> str:
    """One digest of a shard's captions: an edited caption makes its shard unfinished."""
    return hashlib.sha256(json.dumps([i.caption for i in items]).encode("utf-8")).hexdigest()


def finished(out_dir: str, shard: int, items: list[Item], settings: dict) -> dict | None:
    """The record of a shard a previous run completed over the same inputs, captions and
    settings, else None."""
    rec_path = os.path.join(out_dir, shard_name(shard)[:-4] + ".json")
    try:
        with open(rec_path) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("inputs") != [i.path for i in items]:
        return None
    if record.get("captions_sha256") != captions_sha256(items) or record.get("settings") != settings:
        return None
    if record.get("samples") and not os.path.isfile(os.path.join(out_dir, shard_name(shard))):
        return None
    return record


# --------------------------------------------------------------------------- the job


def make_shards(input: str, output: str, samples_per_shard: int = 1000, workers: int = 1, min_frames: int = 1,
                progress: bool = True, allow_empty_captions: bool = False) -> dict:
    """Pack `input` into shards under `output`; returns the manifest, plus what this run did:
    `kept` and `written`, each {"shards": tars, "samples": n} (not stored in manifest.json)."""
    if samples_per_shard < 1:
        raise DataError(f"--samples-per-shard: is {samples_per_shard}, expected >= 1")
    if min_frames < 1:
        raise DataError(f"--min-frames: is {min_frames}, expected >= 1")
    items = list_inputs(input)
    if os.path.exists(output) and not os.path.isdir(output):
        raise DataError(f"--output: {output} exists and is not a folder")
    os.makedirs(output, exist_ok=True)
    plan = [items[i:i + samples_per_shard] for i in range(0, len(items), samples_per_shard)]
    # What changes which inputs a shard keeps; a record written with other settings is redone.
    settings = {"min_frames": min_frames, "allow_empty_captions": allow_empty_captions}
    records: dict[int, dict] = {}
    todo = []
    for s, group in enumerate(plan):
        rec = finished(output, s, group, settings)
        if rec is not None:
            records[s] = rec
        else:
            todo.append(s)
    kept = [records[s] for s in records]
    jobs = [(item, min_frames, allow_empty_captions) for s in todo for item in plan[s]]
    bar = tqdm(total=len(jobs), unit="video", desc="make_shards", disable=not progress)
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 and jobs else None
    try:
        results = pool.imap(examine, jobs, chunksize=1) if pool else map(examine, jobs)
        for s in todo:
            got = []
            for _ in plan[s]:
                got.append(next(results))
                bar.update(1)
            records[s] = write_shard(output, s, got, settings)
    finally:
        bar.close()
        if pool:
            pool.close()
            pool.join()
    manifest = write_summary(output, [records[s] for s in range(len(plan))], samples_per_shard)
    written = [records[s] for s in todo]
    return {**manifest, "kept": _tally(kept), "written": _tally(written)}


def _tally(records: list[dict]) -> dict:
    # Shards are the tars: a group whose inputs were all rejected leaves only its record.
    return {"shards": sum(1 for r in records if r["samples"]), "samples": sum(r["samples"] for r in records)}


def write_summary(output: str, records: list[dict], samples_per_shard: int) -> dict:
    shards = [{"name": r["shard"], "samples": r["samples"], "frames": r["frames"], "seconds": round(r["seconds"], 3)}
              for r in records if r["samples"]]
    rejects = [rej for r in records for rej in r["rejects"]]
    manifest = {
        "format": "video2dataset-style webdataset",
        "samples_per_shard": samples_per_shard,
        "shards": shards,
        "samples": sum(s["samples"] for s in shards),
        "rejected": len(rejects),
        "total_frames": sum(s["frames"] for s in shards),
        "total_hours": sum(r["seconds"] for r in records) / 3600.0,
    }
    write_text_atomic(os.path.join(output, "rejects.jsonl"), "".join(json.dumps(r) + "\n" for r in rejects))
    write_text_atomic(os.path.join(output, "manifest.json"), json.dumps(manifest, indent=1))
    return manifest
