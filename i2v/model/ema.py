"""The EMA of the trainable weights, kept beside DeepSpeed's fp32 master partitions, one shard per rank.

Each rank averages only the fp32 master elements that its optimizer partition owns, read through
DeepSpeed's tensor-fragment API:
- ZeRO-1/2: the `_hp_mapping` fragment of each parameter (elements [start, end) of the flattened
  parameter that live in this rank's flat fp32 partition; a parameter may span two ranks);
- ZeRO-3: `deepspeed.utils.safe_get_local_fp32_param`, this rank's slice of each parameter;
- ZeRO-0 (fp32 only, the config refuses mixed precision there): the parameters themselves, the same
  on every rank.
An update reads local memory only, so it costs no communication, and a rank holds 4 bytes x
trainable parameters / world size (ZeRO-1/2/3).

Update rule at optimizer step s: before `train.ema.start_step` the EMA follows the weights exactly;
from then on, every `update_every` steps, ema <- d * ema + (1 - d) * w, with d = decay, or
min(decay, (1 + n) / (10 + n)) with `warmup`, n counting the averaging updates made so far.

Stored world-size-free: `ema/rank-NNNNN.safetensors` in the checkpoint holds one 1-D fp32 tensor
per fragment, keyed `name[start:end]` (the parameter name and its flat element range), plus the
update count and every parameter's shape. `stitch` assembles the full EMA offline from any set
of such files (export), and `ShardedEMA.load` reads back whatever ranges this rank owns now, so
the files can be re-sliced at another world size.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from i2v.config import EMAConfig
from i2v.core.errors import CheckpointError

EMA_DIR = "ema"
_KEY = re.compile(r"^(.*)\[(\d+):(\d+)\]$")


@dataclass
class _Fragment:
    name: str
    start: int  # first element of the flattened parameter held here
    end: int
    read: Callable[[], torch.Tensor]  # the current fp32 master values of [start, end)


def _fragments(engine) -> tuple[list[_Fragment], dict[str, list[int]]]:
    """This rank's fp32 master fragments of every trainable parameter, and all their shapes."""
    from deepspeed.utils import safe_get_local_fp32_param

    stage = engine.zero_optimization_stage()
    fragments, shapes = [], {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        if stage == 3:
            shapes[name] = list(p.ds_shape)
            per = p.partition_numel()
            start = dist.get_rank(group=p.ds_process_group) * per
            end = min(start + per, p.ds_numel)  # the last partition is padded
            if end > start:
                fragments.append(_Fragment(name, start, end,
                                           lambda p=p, n=end - start: safe_get_local_fp32_param(p)[:n]))
        elif stage in (1, 2):
            shapes[name] = list(p.shape)
            if p._hp_mapping is not None:  # None: no element of p lives in this rank's partition
                a = p._hp_mapping.lp_fragment_address
                # Looked up at every read: DeepSpeed may relink the mapping (e.g. after loading a checkpoint).
                fragments.append(_Fragment(name, a.start, a.start + a.numel,
                                           lambda p=p: p._hp_mapping.get_hp_fragment()))
        else:
            shapes[name] = list(p.shape)
            fragments.append(_Fragment(name, 0, p.numel(), lambda p=p: p.detach().reshape(-1)))
    return fragments, shapes


class ShardedEMA:
    def __init__(self, engine, cfg: EMAConfig):
        self.cfg = cfg
        self.fragments, self.shapes = _fragments(engine)
        self.replicated = engine.zero_optimization_stage() == 0  # every rank holds all of it
        self.device = engine.device
        self.updates = 0  # averaging updates made so far (n)
        with torch.no_grad():
            self.shadow = [f.read().detach().float().clone() for f in self.fragments]

    @torch.no_grad()
    def reset(self) -> None:
        """Start over from the current weights (a resume from a checkpoint without an EMA)."""
        for f, e in zip(self.fragments, self.shadow):
            e.copy_(f.read())
        self.updates = 0

    @property
    def local_bytes(self) -> int:
        return sum(e.numel() * e.element_size() for e in self.shadow)

    def decay(self) -> float:
        d = self.cfg.decay
        return min(d, (1 + self.updates) / (10 + self.updates)) if self.cfg.warmup else d

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Call after optimizer step `step` (1-based) on every rank; local memory only."""
        c = self.cfg
        if step < c.start_step:
            for f, e in zip(self.fragments, self.shadow):
                e.copy_(f.read())
            return
        if (step - c.start_step) % c.update_every:
            return
        weight = 1.0 - self.decay()
        for f, e in zip(self.fragments, self.shadow):
            e.lerp_(f.read().float(), weight)
        self.updates += 1

    # -- checkpoint -----------------------------------------------------------------

    def save(self, checkpoint_dir: str, rank: int) -> None:
        """Write this rank's shard into the (uncommitted) checkpoint directory."""
        from safetensors.torch import save_file

        if self.replicated and rank != 0:
            return
        tensors = {f"{f.name}[{f.start}:{f.end}]": e.detach().cpu().contiguous()
                   for f, e in zip(self.fragments, self.shadow)}
        directory = os.path.join(checkpoint_dir, EMA_DIR)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"rank-{rank:05d}.safetensors")
        save_file(tensors, f"{path}.tmp", metadata={"updates": str(self.updates), "shapes": json.dumps(self.shapes)})
        os.replace(f"{path}.tmp", path)

    def load(self, checkpoint_dir: str) -> bool:
        """Read this rank's ranges from the checkpoint's shards (written at any world size); False if none."""
        store = EMAFiles.open(checkpoint_dir)
        if store is None:
            return False
        with torch.no_grad():
            for f, e in zip(self.fragments, self.shadow):
                e.copy_(store.read(f.name, f.start, f.end))
        self.updates = store.updates
        return True

    # -- the full EMA on every rank (validation) ----------------------------------------

    def full_tensors(self):
        """(name, full fp32 EMA) of every trainable parameter, in the same order on every rank.

        A collective on all ranks: one all-reduce per parameter of the disjoint fragments (none at
        ZeRO-0, where every rank holds it all). Peak memory: one full parameter.
        """
        mine: dict[str, list] = {}
        for f, e in zip(self.fragments, self.shadow):
            mine.setdefault(f.name, []).append((f, e))
        reduce = not self.replicated and dist.is_initialized() and dist.get_world_size() > 1
        for name, shape in self.shapes.items():
            buf = torch.zeros(math.prod(shape), dtype=torch.float32, device=self.device)
            for f, e in mine.get(name, []):
                buf[f.start:f.end].copy_(e)
            if reduce:
                dist.all_reduce(buf)
            yield name, buf.view(shape)

    @contextlib.contextmanager
    def swapped_into(self, model: torch.nn.Module, restore: bool = True):
        """`model` (the engine's module at ZeRO 0-2, a private replica at ZeRO-3) with EMA weights inside.

        With `restore` the live values come back afterwards, bit for bit (kept: one copy of the
        trainable parameters). Collective: every rank enters it.
        """
        params = dict(model.named_parameters())
        saved = {}
        try:
            with torch.no_grad():
                for name, full in self.full_tensors():
                    p = params[name]
                    if restore:
                        saved[name] = p.detach().clone()
                    p.copy_(full.view(p.shape))
            yield model
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)


# --------------------------------------------------------------------------- the files


class EMAFiles:
    """Every fragment in a checkpoint's `ema/` shards, readable by (name, element range)."""

    def __init__(self, directory: str, files: list[str]):
        from safetensors import safe_open

        self.directory, self.pieces, self.shapes, counts = directory, {}, {}, set()
        self.handles = {path: safe_open(path, framework="pt") for path in files}
        for path, h in self.handles.items():
            meta = h.metadata() or {}
            counts.add(int(meta.get("updates", -1)))
            self.shapes.update(json.loads(meta.get("shapes", "{}")))
            for key in h.keys():
                m = _KEY.match(key)
                if m is None:
                    raise CheckpointError(f"checkpoint {directory}: {path} holds {key!r}, not an EMA fragment")
                self.pieces.setdefault(m[1], []).append((int(m[2]), int(m[3]), path, key))
        if len(counts) != 1 or -1 in counts:
            raise CheckpointError(f"checkpoint {directory}: the EMA shards disagree on their update count ({counts})")
        self.updates = counts.pop()

    @classmethod
    def open(cls, checkpoint_dir: str) -> "EMAFiles | None":
        files = sorted(glob.glob(os.path.join(checkpoint_dir, EMA_DIR, "rank-*.safetensors")))
        return cls(checkpoint_dir, files) if files else None

    def read(self, name: str, start: int, end: int) -> torch.Tensor:
        out = torch.empty(end - start, dtype=torch.float32)
        covered = 0
        for s, e, path, key in self.pieces.get(name, []):
            lo, hi = max(s, start), min(e, end)
            if lo < hi:
                out[lo - start:hi - start] = self.handles[path].get_slice(key)[lo - s:hi - s]
                covered += hi - lo
        if covered != end - start:  # fragments are disjoint, so a short count is a gap
            raise CheckpointError(f"checkpoint {self.directory}: the EMA shards in {EMA_DIR}/ do not cover "
                                  f"{name}[{start}:{end}] ({covered} of {end - start} elements)")
        return out


def stitch(checkpoint_dir: str) -> dict[str, torch.Tensor] | None:
    """The full fp32 EMA of a checkpoint, from its per-rank shards, on one process (None: it has none)."""
    store = EMAFiles.open(checkpoint_dir)
    if store is None:
        return None
    return {name: store.read(name, 0, math.prod(shape)).view(shape) for name, shape in store.shapes.items()}
