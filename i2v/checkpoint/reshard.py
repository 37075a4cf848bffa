"""ZeRO-1/2/3 checkpoints resumed at another world size, through DeepSpeed's universal checkpoint.

DeepSpeed's ZeRO files hold each rank's flat slice of the fp32 master weights and Adam moments, so
they load only at the world size that wrote them. `deepspeed.checkpoint.ds_to_universal` rewrites
them as one file per parameter and state (zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt), which any
world size slices again.

A committed checkpoint is converted once, by rank 0, into `checkpoints/universal/<tag>/`: written
under a tmp- name, recorded in its own COMMITTED.json (with the sha256 of the source's marker)
and renamed. A half-written or corrupt conversion, or one made from an older copy of the tag, is
never loaded: it is made again. `launcher/reshard.py` does the same offline, for models whose
conversion would outlast the collective timeout of a waiting job.

What DeepSpeed 0.19.8's universal load leaves out, and how i2v makes up for it:
- parameter-group hyperparameters: its ZeRO-3 path copies group 0's (lr, weight decay) onto
  every group; each group's are set again from the trainer's record (client state `param_groups`);
- its ZeRO-3 path also hands one Adam step counter to every sub-group, which then counts each
  optimizer step once per group: each state gets its own copy;
- frozen parameters and buffers are not loaded: the DiT has no persistent buffers (checked, so a
  model that gets one fails here instead of resuming without it), and its only frozen parameters,
  a LoRA base, are rebuilt from model.pretrained / model.arch, whose identity the checkpoint records;
- RNG, data position, counters and the EMA are read from the source checkpoint, as at any resume.
A change of ZeRO stage is refused before this (i2v.checkpoint.checkpointer.check_engine_layout): the universal
load does not cross the ZeRO-1/2 <-> ZeRO-3 boundary.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import time

import torch

from i2v.checkpoint.commit import MARKER, TMP_PREFIX, UNIVERSAL, universal_path, verify_marker, write_marker
from i2v.core.distributed import DistEnv, all_ranks_agree
from i2v.core.errors import CheckpointError
from i2v.core.fsutil import fsync_dir, sha256_file


def _source_id(source: str) -> str:
    return sha256_file(os.path.join(source, MARKER))


def converted(root: str, tag: str) -> str | None:
    """The committed universal form of `tag`, if one verifies and was made from the current `tag`."""
    path = universal_path(root, tag)
    try:
        marker = verify_marker(path)
    except CheckpointError:
        return None
    return path if marker.get("source_marker_sha256") == _source_id(os.path.join(root, tag)) else None


def convert(root: str, tag: str, workers: int = 1, log=print, verify_source: bool = True) -> str:
    """Convert the committed checkpoint `root/tag` into its universal form (once); returns its path.

    `verify_source=False`: the caller has just verified `root/tag` (the trainer's resume has).
    """
    source = os.path.join(root, tag)
    if verify_source:
        marker = verify_marker(source)
    else:
        with open(os.path.join(source, MARKER)) as f:
            marker = json.load(f)
    done = converted(root, tag)
    if done:
        log(f"universal form of {tag} already committed: {done}")
        return done
    if marker.get("step", 1) == 0:  # DeepSpeed creates Adam's state at the first step
        raise CheckpointError(f"checkpoint {source} was taken before the first optimizer step and holds no "
                              "optimizer state to reshard; start the run afresh at the new world size")
    final, tmp = universal_path(root, tag), os.path.join(root, UNIVERSAL, f"{TMP_PREFIX}{tag}")
    for stale in (tmp, final):
        shutil.rmtree(stale, ignore_errors=True)
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    log(f"converting {source} (written by {marker['world_size']} rank(s)) to DeepSpeed's universal form -> {final}")
    start = time.perf_counter()
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=source, output_folder=tmp, num_extract_workers=workers,
                              num_merge_workers=workers, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter):
            ds_to_universal.main(args)
    except Exception as e:  # noqa: BLE001 - whatever the converter hits, the user sees which checkpoint failed
        raise CheckpointError(f"checkpoint {source}: conversion to the universal form failed: "
                              f"{type(e).__name__}: {e}\n{chatter.getvalue()[-2000:]}") from None
    # The converter points a `latest_universal` file beside its output at the tmp- name; i2v loads by tag.
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(root, UNIVERSAL, "latest_universal"))
    write_marker(tmp, source=tag, source_marker_sha256=_source_id(source), step=marker.get("step"))
    os.rename(tmp, final)  # the commit
    fsync_dir(os.path.dirname(final))
    log(f"converted {tag} in {time.perf_counter() - start:.1f} s")
    return final


def _persistent_buffers(module) -> list[str]:
    return [f"{name}.{b}" if name else b for name, m in module.named_modules()
            for b, t in m._buffers.items() if t is not None and b not in m._non_persistent_buffers_set]


def restore_param_groups(engine, client_state: dict, where: str) -> None:
    """Set each optimizer group's hyperparameters (lr, weight decay, betas...) to those saved with it."""
    recorded = client_state.get("param_groups")
    if recorded is None:  # written before the trainer kept the record
        return
    groups = engine.optimizer.param_groups
    if len(groups) != len(recorded):
        raise CheckpointError(f"checkpoint {where} has {len(recorded)} optimizer parameter groups, this run "
                              f"{len(groups)}; resume with the train.no_decay it was written with")
    for group, saved in zip(groups, recorded):
        group.update(saved)


def unshare_step_counters(engine) -> None:
    """Give each parameter's Adam state its own step counter.

    The ZeRO-3 universal load assigns one step tensor to every sub-group's state; Adam increments it
    in place, once per sub-group, so with two groups it would count two steps per optimizer step and
    skew the bias correction from the first step after the resume.

    A fused Adam (on CUDA, i2v.train.optim) keeps its counters as fp32 tensors beside its parameters,
    where torch's own `load_state_dict` puts them; the universal load leaves them where they were read.
    """
    opt = engine.optimizer.optimizer
    fused = any(g.get("fused") for g in opt.param_groups)
    for p, state in opt.state.items():
        if torch.is_tensor(state.get("step")):
            step = state["step"]
            state["step"] = step.to(p.device, torch.float32, copy=True) if fused else step.clone()


def load_resharded(engine, root: str, tag: str, env: DistEnv, strict: bool = True):
    """Load ZeRO checkpoint `root/tag`, written at another world size, into `engine` via its universal form.

    Returns DeepSpeed's (load_path, client_state). Every rank must call it.
    """
    buffers = _persistent_buffers(engine.module)
    if buffers:
        raise CheckpointError(f"checkpoint {root}/{tag}: resharding would not restore the model's buffers "
                              f"({', '.join(buffers[:3])}); resume at the world size that wrote it")
    log = (lambda m: print(f"[i2v] {m}", flush=True)) if env.is_main else (lambda m: None)
    with all_ranks_agree(env, "universal conversion"):  # also the barrier: no rank reads before the commit
        if env.is_main:  # the resume verified the source; convert verifies a conversion it reuses
            convert(root, tag, log=log, verify_source=False)
    # Rank 0 verified (or wrote) it; the other ranks need only see its commit on the shared filesystem.
    path = universal_path(root, tag)
    if not os.path.isfile(os.path.join(path, MARKER)):
        raise CheckpointError(f"{path}: no committed universal form of {tag} to load (is checkpoints/ on a "
                              "filesystem every node sees?)")
    config = engine._config
    config.load_universal_checkpoint = True  # DeepSpeed reads the flag only inside load_checkpoint
    try:
        load_path, client_state = engine.load_checkpoint(os.path.dirname(path), tag=tag, load_optimizer_states=True,
                                                         load_lr_scheduler_states=True, load_module_strict=strict)
    finally:
        config.load_universal_checkpoint = False
    if load_path is not None:
        restore_param_groups(engine, client_state, path)
        unshare_step_counters(engine)
    return load_path, client_state
