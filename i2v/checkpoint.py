"""Atomic DeepSpeed checkpoints and resume.

Layout under `run.output_dir/checkpoints/`:

    step-00000040/            a committed checkpoint: DeepSpeed's files, rng/, COMMITTED.json
    tmp-step-00000060/        being written (or orphaned by a crash: removed on the next start)
    latest                    the newest committed tag, replaced atomically
    universal/step-00000040/  its DeepSpeed universal form, made once when a ZeRO run resumes at
                              another world size (i2v.reshard), committed the same way

A save writes under a temporary tag, every rank adds its RNG state, rank 0 records the size
and sha256 of every file in COMMITTED.json, renames the directory to its final tag (the commit)
and only then moves `latest`. A directory without COMMITTED.json is never resumed from, and a
file whose size or hash differs from the record marks the checkpoint corrupt.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch

from i2v.distributed import DistEnv, barrier
from i2v.errors import CheckpointError, ConfigError
from i2v.faults import maybe_fault
from i2v.fsutil import fsync_dir, sha256_file, write_text_atomic

MARKER = "COMMITTED.json"
TAG_RE = re.compile(r"^step-(\d{8})$")
UNIVERSAL = "universal"  # checkpoints/universal/<tag>: a tag's resharded form (i2v.reshard)


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def universal_path(root: str, tag: str) -> str:
    return os.path.join(root, UNIVERSAL, tag)


# --------------------------------------------------------------------------- RNG state


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


def write_marker(directory: str, **record) -> None:
    """Write `directory`/COMMITTED.json: `record` plus the size and sha256 of every file under it."""
    files = {}
    for dirpath, _, names in os.walk(directory):
        for n in sorted(names):
            p = os.path.join(dirpath, n)
            files[os.path.relpath(p, directory)] = {"size": os.path.getsize(p), "sha256": sha256_file(p)}
    write_text_atomic(os.path.join(directory, MARKER), json.dumps({**record, "files": files}, indent=1, sort_keys=True))


def verify_marker(directory: str) -> dict:
    """The commit record of `directory`; CheckpointError if a recorded file is missing, truncated or altered."""
    try:
        with open(os.path.join(directory, MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {directory}: unreadable commit marker {MARKER}: {e}") from None
    for rel, rec in marker["files"].items():
        p = os.path.join(directory, rel)
        if not os.path.isfile(p):
            raise CheckpointError(f"checkpoint {directory}: file {rel} is missing")
        size = os.path.getsize(p)
        if size != rec["size"]:
            raise CheckpointError(f"checkpoint {directory}: file {rel} is {size} bytes, expected {rec['size']} (truncated?)")
        if sha256_file(p) != rec["sha256"]:
            raise CheckpointError(f"checkpoint {directory}: file {rel} does not match its recorded sha256 (corrupt)")
    return marker


# --------------------------------------------------------------------------- checkpointer


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
                if os.path.isdir(path) and (name.startswith("tmp-") or uncommitted):
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(os.path.relpath(path, self.root))
        barrier()
        return removed

    # -- saving -----------------------------------------------------------------

    def save(self, engine, step: int, client_state: dict, ema=None) -> str:
        tag = tag_for(step)
        tmp_tag = f"tmp-{tag}"
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
        ZeRO-1/2/3 state written at another world size goes through its universal form (i2v.reshard).
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
            from i2v.reshard import load_resharded

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


def finished_step(cfg) -> int | None:
    """The step of the run's newest committed checkpoint when it has reached train.max_steps (a rerun of a
    finished run then has nothing to do), else None. Reads the commit markers only: no engine, no ranks."""
    root = os.path.join(cfg.run.output_dir, "checkpoints")
    if not cfg.checkpoint.resume or not os.path.isdir(root):
        return None
    for tag in sorted((t for t in os.listdir(root) if TAG_RE.match(t)), reverse=True):
        try:
            with open(os.path.join(root, tag, MARKER)) as f:
                step = int(json.load(f)["step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # uncommitted or unreadable: the trainer's resume deals with it
        return step if step >= cfg.train.max_steps else None
    return None


def consolidated_state_dict(checkpoint_dir: str) -> dict:
    """fp32 weights of the model from a checkpoint directory (any ZeRO stage), on the CPU."""
    checkpoint_dir = os.path.abspath(checkpoint_dir.rstrip("/"))
    if not os.path.isdir(checkpoint_dir):
        raise CheckpointError(f"checkpoint directory not found: {checkpoint_dir}")
    root, tag = os.path.split(checkpoint_dir)
    if os.path.isfile(os.path.join(checkpoint_dir, "latest")):  # given the checkpoints/ root
        root = checkpoint_dir
        with open(os.path.join(root, "latest")) as f:
            tag = f.read().strip()
    files = os.listdir(os.path.join(root, tag))
    if any("optim_states" in f for f in files):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
    states = os.path.join(root, tag, "mp_rank_00_model_states.pt")
    if not os.path.isfile(states):
        raise CheckpointError(f"{os.path.join(root, tag)} holds no DeepSpeed model states")
    return {k: v.float() for k, v in torch.load(states, map_location="cpu", weights_only=True)["module"].items()}


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


def saved_client_state(checkpoint_dir: str) -> dict:
    """The trainer's client state (config, counters, base identity) stored in a checkpoint, read without DeepSpeed."""
    # ZeRO-3 names rank 0's model-states file differently; either carries the client state.
    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    found = [os.path.join(checkpoint_dir, n) for n in names if os.path.isfile(os.path.join(checkpoint_dir, n))]
    if not found:
        raise CheckpointError(f"checkpoint {checkpoint_dir} holds no DeepSpeed model states ({' or '.join(names)})")
    try:  # mmap: a full fine-tune's file holds the whole model, and only the small entries are read
        state = torch.load(found[0], map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise CheckpointError(f"checkpoint {checkpoint_dir}: cannot read {found[0]}: {e}") from None
    return {k: v for k, v in state.items() if k not in ("module", "optimizer", "lr_scheduler")}


def load_trained_transformer(cfg, checkpoint_dir: str, weights: str = "live"):
    """The trained DiT of a checkpoint, built from the run's config (LoRA adapters included), in eval mode.

    `weights`: "live" (DeepSpeed's fp32 consolidation of the trained weights) or "ema" (the stitched
    EMA over the trainable parameters). A LoRA checkpoint holds only the trainable parameters: the
    frozen base comes from `model.pretrained` / `model.arch`.
    """
    from i2v.adapters import lora_enabled, trainable_names, with_lora
    from i2v.ema import stitch
    from i2v.model import build_transformer

    model = with_lora(build_transformer(cfg.model, seed=cfg.run.seed), cfg.model, seed=cfg.run.seed)
    state = consolidated_state_dict(checkpoint_dir)
    if weights == "ema":
        ema = stitch(checkpoint_dir)
        if ema is None:
            raise ConfigError(f"--weights ema: checkpoint {checkpoint_dir} holds no EMA (train.ema.decay was 0); "
                              "train with train.ema.decay > 0, or use --weights live")
        state.update(ema)
    expected = model.state_dict()
    required = trainable_names(model) if lora_enabled(cfg.model) else list(expected)
    missing = [k for k in required if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in state
             if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"checkpoint {checkpoint_dir} does not fit the model of the config ({cfg.model.pretrained or 'model.arch'}, "
            f"model.lora.rank {cfg.model.lora.rank}): missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"shape mismatches {wrong[:3]}"
        )
    model.load_state_dict(state, strict=False)
    return model.eval()
