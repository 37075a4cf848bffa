"""Saving and resuming a training run's DeepSpeed checkpoints, with every rank's RNG state.

The commit protocol and the layout on disk are `i2v.checkpoint.commit`'s; a ZeRO checkpoint written
at another world size loads through its universal form (`i2v.checkpoint.reshard`)."""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch

from i2v.checkpoint.commit import (MARKER, TAG_RE, TMP_PREFIX, UNIVERSAL, tag_for, universal_path, verify_marker,
                                   write_marker)
from i2v.core.distributed import DistEnv, barrier
from i2v.core.errors import CheckpointError
from i2v.core.faults import maybe_fault
from i2v.core.fsutil import fsync_dir, write_text_atomic

def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) generator states as JSON-safe values (nothing pickled)."""
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _numpy_state() -> list:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]


def set_rng_state(state: dict) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, g = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, g))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# --------------------------------------------------------------------------- commit markers


class Checkpointer:
    def __init__(self, root: str, keep_last: int, env: DistEnv, trainable_only: bool = False):
        """`trainable_only` (LoRA): leave the frozen base out; it is rebuilt from model.pretrained/arch."""
        self.root, self.keep_last, self.env, self.trainable_only = root, keep_last, env, trainable_only
        if env.is_main:
            os.makedirs(root, exist_ok=True)
        barrier()

    # -- listing ----------------------------------------------------------------

    def committed_tags(self) -> list[str]:
        """Committed tags, newest first."""
        if not os.path.isdir(self.root):
            return []
        tags = [t for t in os.listdir(self.root) if TAG_RE.match(t) and os.path.isfile(os.path.join(self.root, t, MARKER))]
        return sorted(tags, reverse=True)

    def clean_orphans(self) -> list[str]:
        """Remove directories a crashed save left behind (rank 0 only)."""
        removed = []
        for parent in (self.root, os.path.join(self.root, UNIVERSAL)):
            if not (self.env.is_main and os.path.isdir(parent)):
                continue
            for name in os.listdir(parent):
                path = os.path.join(parent, name)
                uncommitted = TAG_RE.match(name) and not os.path.isfile(os.path.join(path, MARKER))
                if os.path.isdir(path) and (name.startswith(TMP_PREFIX) or uncommitted):
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(os.path.relpath(path, self.root))
        barrier()
        return removed

    # -- saving -----------------------------------------------------------------

    def save(self, engine, step: int, client_state: dict, ema=None) -> str:
        tag = tag_for(step)
        tmp_tag = f"{TMP_PREFIX}{tag}"
        tmp_dir = os.path.join(self.root, tmp_tag)
        engine.save_checkpoint(self.root, tag=tmp_tag, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=self.trainable_only)
        if ema is not None:  # inside the directory before the commit, so COMMITTED.json covers it
            ema.save(tmp_dir, self.env.rank)
        os.makedirs(os.path.join(tmp_dir, "rng"), exist_ok=True)
        write_text_atomic(os.path.join(tmp_dir, "rng", f"rank-{self.env.rank}.json"), json.dumps(rng_state()))
        maybe_fault("mid_checkpoint", self.env.rank, step)
        barrier()
        if self.env.is_main:
            write_marker(tmp_dir, step=step, world_size=self.env.world_size)
            final = os.path.join(self.root, tag)
            if os.path.exists(final):  # a stale copy of the same step from an earlier attempt
                shutil.rmtree(final)
            os.rename(tmp_dir, final)  # the commit
            fsync_dir(self.root)
            write_text_atomic(os.path.join(self.root, "latest"), tag)
            self._prune()
        barrier()
        return tag

    def _prune(self) -> None:
        # Never deletes the newest committed checkpoint: keep_last >= 1 is enforced by the config.
        for tag in self.committed_tags()[self.keep_last :]:
            shutil.rmtree(os.path.join(self.root, tag), ignore_errors=True)
            shutil.rmtree(universal_path(self.root, tag), ignore_errors=True)  # its resharded form, if any

    # -- loading ----------------------------------------------------------------

    def verify(self, tag: str) -> None:
        """Raise CheckpointError if a file of `tag` is missing, truncated or altered."""
        verify_marker(os.path.join(self.root, tag))

    def choose(self, fallback: bool) -> tuple[str | None, list[str]]:
        """The newest committed tag that verifies; corrupt ones are reported (and skipped if allowed)."""
        problems = []
        for tag in self.committed_tags():
            try:
                self.verify(tag)
                return tag, problems
            except CheckpointError as e:
                if not fallback:
                    raise CheckpointError(f"{e}; set checkpoint.fallback_on_corrupt=true to resume from an older one") from None
                problems.append(str(e))
        return None, problems

    def load(self, engine, tag: str, reshard_blocker: str | None = None, ema=None) -> dict:
        """Load `tag` into the engine (and `ema`); returns its client state. RNG states are restored last.

        `reshard_blocker` names what prevents loading at another world size (None: nothing does).
        ZeRO-1/2/3 state written at another world size goes through its universal form (i2v.checkpoint.reshard).
        """
        path = os.path.join(self.root, tag)
        with open(os.path.join(path, MARKER)) as f:
            marker = json.load(f)
        resharding = marker["world_size"] != self.env.world_size
        if resharding and reshard_blocker:
            raise CheckpointError(
                f"checkpoint {path} was written by {marker['world_size']} rank(s), this run has {self.env.world_size}: "
                f"{reshard_blocker} cannot be resharded here; relaunch with {marker['world_size']} ranks, "
                "or export the weights and start a new run"
            )
        if resharding and engine.zero_optimization_stage() > 0:
            from i2v.checkpoint.reshard import load_resharded

            load_path, client_state = load_resharded(engine, self.root, tag, self.env,
                                                     strict=not self.trainable_only)
        else:
            load_path, client_state = engine.load_checkpoint(self.root, tag=tag, load_optimizer_states=True,
                                                             load_lr_scheduler_states=True,
                                                             load_module_strict=not self.trainable_only)
        if load_path is None:
            raise CheckpointError(f"checkpoint {path}: DeepSpeed could not load it")
        if ema is not None and not ema.load(path):
            ema.reset()  # the EMA was switched on after this checkpoint: it starts from the loaded weights
            if self.env.is_main:
                print(f"[i2v] checkpoint {tag} holds no EMA; it starts from the loaded weights", flush=True)
        rng_file = os.path.join(path, "rng", f"rank-{self.env.rank}.json")
        if os.path.isfile(rng_file):  # a rank that did not exist at save time keeps its fresh state
            with open(rng_file) as f:
                set_rng_state(json.load(f))
        return client_state


def check_engine_layout(cfg, recorded: dict, where: str) -> None:
    """Refuse, before any loading, a resume whose DeepSpeed optimizer state is laid out differently.

    Each ZeRO stage and precision writes its own optimizer files (names, flat groups, master copies);
    DeepSpeed would fail deep inside the load, or start a fresh optimizer, on another one.
    """
    saved = (recorded.get("config") or {}).get("deepspeed") or {}
    now = {"zero_stage": cfg.deepspeed.zero_stage, "precision": cfg.deepspeed.precision}
    changed = [k for k, v in now.items() if k in saved and saved[k] != v]
    if changed:
        diffs = [f"deepspeed.{k}: checkpoint has {saved[k]!r}, this run has {now[k]!r}" for k in changed]
        fix = " ".join(f"deepspeed.{k}={saved[k]}" for k in changed)
        raise CheckpointError(f"checkpoint {where} cannot be resumed by this engine: {'; '.join(diffs)}. DeepSpeed's "
                              f"optimizer state of one layout does not load into another; resume with {fix}, or "
                              "export the weights and start a new run from them")
