"""Shard lists and the stages every WebDataset pipeline here shares.

- `expand_shards`: a directory, a .tar path, a brace pattern or a URL -> list of shard URLs,
  with clear errors naming the config key; `pipe:` URLs only when explicitly allowed.
- `split_for(rank, world, worker, workers)`: the shards of one (rank, worker) slot, disjoint
  across all slots, so no sample is read twice in an epoch.
- `shuffle_buffer`, `grouped`: the seeded sample shuffle and the grouping of same-shape samples into
  batches.
- `BadSamples`: counts bad samples (and unreadable shards) by reason, names each by `__key__` or
  path once, and stops the run when the bad fraction passes a limit.
"""

from __future__ import annotations

import collections
import glob
import os
import random
import threading
from typing import Callable, Hashable, Iterable, Iterator

import braceexpand

from i2v.core.errors import DataError

REMOTE_PREFIXES = ("http://", "https://", "s3://", "gs://", "gcs://", "ais://", "hf://")


def expand_shards(spec: str | list[str], key: str, allow_pipe: bool = False, suffix: str = ".tar",
                  remote_cfg=None) -> list[str]:
    """Resolve a shard spec to a sorted list of URLs or paths; `key` names the config key in errors.
    An `s3://bucket/prefix/` folder (ending in /) is listed, like a local directory."""
    if not spec:
        raise DataError(f"{key}: no shards given (set it to a directory, a .tar path or a brace pattern)")
    specs = spec if isinstance(spec, list) else [spec]
    urls: list[str] = []
    for item in specs:
        if item.startswith("pipe:"):
            if not allow_pipe:
                raise DataError(
                    f"{key}: {item!r} is a pipe: URL, which runs a shell command; "
                    "set data.allow_pipe=true to allow it"
                )
            urls.extend(braceexpand.braceexpand(item))
        elif item.startswith("s3://") and item.endswith("/"):
            from i2v.data import remote

            found = remote.list_s3(item, suffix, remote_cfg)
            if not found:
                raise DataError(f"{key}: {item} holds no *{suffix} objects")
            urls.extend(found)
        elif item.startswith(REMOTE_PREFIXES):
            urls.extend(braceexpand.braceexpand(item))
        elif os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(item, f"*{suffix}")))
            if not found:
                raise DataError(f"{key}: directory {item} holds no *{suffix} shards")
            urls.extend(found)
        else:
            expanded = list(braceexpand.braceexpand(item))
            missing = [p for p in expanded if not os.path.isfile(p)]
            if missing:
                hint = ("; latent shards are written by launcher/precompute.py (`make demo` writes runs/demo/latents)"
                        if key.endswith("latent_shards") else "")
                raise DataError(f"{key}: shard not found: {missing[0]}"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") + hint)
            empty = [p for p in expanded if os.path.getsize(p) == 0]
            if empty:
                raise DataError(f"{key}: shard is empty (0 bytes): {empty[0]}")
            urls.extend(expanded)
    for u in urls:
        if not u.startswith(REMOTE_PREFIXES + ("pipe:",)) and os.path.getsize(u) == 0:
            raise DataError(f"{key}: shard is empty (0 bytes): {u}")
    return urls


def split_for(urls: list[str], rank: int, world: int, worker: int, workers: int) -> list[str]:
    """Shards of slot (rank, worker): every (rank*workers + worker)-th shard.

    Raises when there are fewer shards than slots, since some slot would get no data and
    the ranks would fall out of step.
    """
    slots = world * max(workers, 1)
    if len(urls) < slots:
        raise DataError(
            f"{len(urls)} shard(s) for {world} rank(s) x {max(workers, 1)} worker(s) = {slots} readers; "
            "every reader needs at least one shard: write more shards or use fewer workers"
        )
    slot = rank * max(workers, 1) + worker
    return urls[slot::slots]


def shuffle_buffer(samples: Iterable, size: int, rng: random.Random) -> Iterator:
    """Seeded reservoir shuffle: emit a random element of a buffer of `size` samples; size <= 1 keeps the order."""
    if size <= 1:
        yield from samples
        return
    buf: list = []
    for s in samples:
        buf.append(s)
        if len(buf) >= size:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def grouped(samples: Iterable, size: int, key: Callable[[object], Hashable]) -> Iterator[list]:
    """Lists of `size` samples with the same `key` (a shape: so each list stacks), each yielded as it fills.

    Partial groups left at the end of the stream are dropped, like drop_last.
    """
    pending: dict[Hashable, list] = {}
    for s in samples:
        k = key(s)
        group = pending.setdefault(k, [])
        group.append(s)
        if len(group) == size:
            yield pending.pop(k)


def sum_by_reason(counts) -> dict[str, int]:
    """Bad-sample counts by reason ({reason: n} each) added up over shards, workers or ranks."""
    total: collections.Counter = collections.Counter()
    for c in counts:
        total.update(c)
    return dict(sorted(total.items()))


class BadSamples:
    """Counts samples that could not be used, by reason, and names each bad item once.

    What the numbers mean: `good`, `by_reason` and so `seen` count *reads*. A stream revisits its
    shards every epoch (or draws them again, resampled), so a sample read in three epochs counts
    three times, good or bad, and the bad fraction is bad reads over all reads: the share of
    training input lost. A shard that cannot be read (or only up to a cut) counts as one bad read
    each time it is read, since how many samples it lost is unknown. `examples` names each bad key
    (a shard:sample or a shard path) once, at its first sighting, so that a message lists distinct
    items rather than one item once per epoch.

    `check()` raises `DataError` once more than `max_fraction` of the samples seen were bad
    (judged after `min_samples` samples, so one early bad sample does not stop a run).
    """

    def __init__(self, max_fraction: float = 0.05, min_samples: int = 20, keep_keys: int = 100):
        self.max_fraction = max_fraction
        self.min_samples = min_samples
        self.keep_keys = keep_keys
        self.good = 0
        self.by_reason: collections.Counter = collections.Counter()
        self.examples: list[tuple[str, str, str]] = []  # (key, reason, detail), distinct keys
        self._named: set[str] = set()  # the keys in `examples`
        self._lock = threading.Lock()
        self._sent = (0, collections.Counter(), 0)  # good, by_reason, examples already in a report

    @property
    def bad(self) -> int:
        return sum(self.by_reason.values())

    @property
    def seen(self) -> int:
        return self.good + self.bad

    def add_good(self, n: int = 1) -> None:
        with self._lock:
            before = self.seen
            self.good += n
        # Bad items read before `min_samples` are judged as soon as that many samples were seen.
        if before < self.min_samples <= self.seen:
            self.check()

    def add_bad(self, key: str, reason: str, detail: str = "") -> None:
        with self._lock:
            self.by_reason[reason] += 1
            self._name(key, reason, detail)
        self.check()

    def _name(self, key: str, reason: str, detail: str) -> None:
        if key not in self._named and len(self.examples) < self.keep_keys:
            self._named.add(key)
            self.examples.append((key, reason, detail))

    def check(self) -> None:
        if self.seen >= self.min_samples and self.bad > self.max_fraction * self.seen:
            shown = "; ".join(f"{k}: {r}" + (f" ({d})" if d else "") for k, r, d in self.examples[:5])
            more = f" and {len(self.examples) - 5} more" if len(self.examples) > 5 else ""
            raise DataError(
                f"{self.bad} of {self.seen} samples read were bad ({self.bad / self.seen:.1%} > data.max_bad_fraction "
                f"{self.max_fraction:.1%}); by reason: {dict(self.by_reason)}; bad: {shown}{more}. "
                "Rewrite or remove the bad shards, or raise data.max_bad_fraction"
            )

    def take_report(self) -> dict:
        """The counts added since the previous report: what a DataLoader worker, whose counts live
        in its own process, hands to the main process with a sample (see `add_report`)."""
        with self._lock:
            good, by_reason, n = self._sent
            report = {"good": self.good - good, "by_reason": dict(self.by_reason - by_reason),
                      "examples": [list(e) for e in self.examples[n:]]}
            self._sent = (self.good, collections.Counter(self.by_reason), len(self.examples))
        return report

    def add_report(self, report: dict) -> None:
        """Add a worker's `take_report()` into these counts, then judge the limit on the totals."""
        with self._lock:
            self.good += report["good"]
            self.by_reason.update(report["by_reason"])
            for key, reason, detail in report["examples"]:
                self._name(key, reason, detail)
        self.check()

    def summary(self) -> dict:
        return {"good": self.good, "bad": self.bad, "by_reason": dict(self.by_reason),
                "examples": [{"key": k, "reason": r, "detail": d} for k, r, d in self.examples]}
