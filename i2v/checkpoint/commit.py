"""The checkpoint commit protocol: the layout on disk, COMMITTED.json, and the one resolver every
reader uses (committed checkpoints only).

Layout under `run.output_dir/checkpoints/`:

    step-00000040/            a committed checkpoint: DeepSpeed's files, rng/, COMMITTED.json
    tmp-step-00000060/        being written (or orphaned by a crash: removed on the next start)
    latest                    the newest committed tag, replaced atomically
    universal/step-00000040/  its DeepSpeed universal form, made once when a ZeRO run resumes at
                              another world size (i2v.checkpoint.reshard), committed the same way

A save writes under a temporary tag, every rank adds its RNG state, rank 0 records the size
and sha256 of every file in COMMITTED.json, renames the directory to its final tag (the commit)
and only then moves `latest`. A directory without COMMITTED.json is never resumed from, and a
file whose size or hash differs from the record marks the checkpoint corrupt.
"""

from __future__ import annotations

import json
import os
import re

import torch

from i2v.core.errors import CheckpointError
from i2v.core.fsutil import sha256_file, write_text_atomic

MARKER = "COMMITTED.json"
TAG_RE = re.compile(r"^step-(\d{8})$")
TMP_PREFIX = "tmp-"  # a tag directory being written: tmp-step-NNNNNNNN, renamed to its tag at the commit
UNIVERSAL = "universal"  # checkpoints/universal/<tag>: a tag's resharded form (i2v.checkpoint.reshard)


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def universal_path(root: str, tag: str) -> str:
    return os.path.join(root, UNIVERSAL, tag)


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


def resolve_committed(path: str) -> str:
    """A committed checkpoint directory from a tag directory or a checkpoints/ root (its `latest`).

    Committed means COMMITTED.json is there and the directory has left its tmp- name: a directory
    being written (or left half-written by a crash) is refused, naming it, even when its marker is
    already in place (a crash between the marker and the rename). The files' hashes are not checked
    here: that reads the whole checkpoint, which the trainer's resume does and a reader need not.
    """
    path = os.path.abspath(path.rstrip("/"))
    if not os.path.isdir(path):
        raise CheckpointError(f"--checkpoint: directory not found: {path}")
    latest = os.path.join(path, "latest")
    if not os.path.isfile(os.path.join(path, MARKER)) and os.path.isfile(latest):
        with open(latest) as f:
            path = os.path.join(path, f.read().strip())
    if os.path.basename(path).startswith(TMP_PREFIX) or not os.path.isfile(os.path.join(path, MARKER)):
        raise CheckpointError(
            f"--checkpoint: {path} is not a committed checkpoint (no {MARKER}, or still under its {TMP_PREFIX} "
            "name); pass a step-NNNNNNNN directory under run.output_dir/checkpoints, or that checkpoints/ "
            "directory itself"
        )
    return path
