"""What a run reports every `train.log_every` steps: the console line, metrics.jsonl and TensorBoard.

`StepLogger.record_batch` counts each trained micro-batch's FLOPs (i2v.model.flops, once per latent
shape) and tokens; `StepLogger.record_step` accumulates step and data-wait times over the logging
window; `StepLogger.log` (called on every rank: loss, FLOPs and tokens are averaged over ranks)
writes one record on rank 0 and starts a new window. The ranks of a sequence-parallel group train
one micro-batch together: they hold the same micro-batch loss, each does 1/SP of its FLOPs (the
replicated text tokens are a rounding error), and its samples and tokens count once.

Throughput: `tflops` is model FLOPs (forward + backward, no recompute) per second per rank; `mfu`
divides it by `train.peak_tflops` (default from the device name) and `hfu` adds the gradient-
checkpointing recompute; both are left out where no peak is known. `tokens_per_s` and
`samples_per_s` are of the whole run. `remote_retries` (`data/remote_retries`) is the number of
remote shard reads retried (i2v.data.remote) over all ranks since the run (re)started.

metrics.jsonl holds each logged step once, in step order: when the loop starts at step N (a resume),
rank 0 rewrites the file with the records of steps up to N only, since a killed run may have logged
steps after its last checkpoint that the resumed run trains and logs again.
"""

from __future__ import annotations

import json
import math
import os
import time

import torch
import torch.distributed as dist

from i2v.config import Config, resolve
from i2v.core.distributed import DistEnv
from i2v.model.checkpointing import effective
from i2v.model.flops import default_peak_tflops, training_flops
from i2v.core.fsutil import fsync_dir, write_text_atomic


class StepLogger:
    def __init__(self, cfg: Config, env: DistEnv, model_config, checkpointing=None):
        """`checkpointing`: the gradient checkpointing the model runs (`auto` resolved); it prices the recompute (HFU)."""
        self.cfg, self.env, self.model_config = cfg, env, model_config
        self.run = resolve(cfg, env.world_size)  # the batch at this world size, fixed for the run
        self.checkpointing = effective(cfg.model.gradient_checkpointing, checkpointing)
        self.flops_by_shape: dict = {}
        self.peak_tflops = cfg.train.peak_tflops
        if self.peak_tflops is None and env.device.type == "cuda":
            self.peak_tflops = default_peak_tflops(torch.cuda.get_device_name(env.device))
        self.writer = None
        if env.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(cfg.run.output_dir, "tensorboard"))
        self.metrics_path = os.path.join(cfg.run.output_dir, "metrics.jsonl")
        # Not `start(0)`: the trainer builds this after a resume, and only `start` knows the step.
        self._begin(0)

    def start(self, step: int) -> None:
        """The loop begins (or resumes) at `step`: the ETA counts from here, and metrics.jsonl drops
        the records of later steps (they are trained and logged again)."""
        if self.env.is_main:
            later, duplicate, unreadable = trim_metrics(self.metrics_path, step)
            dropped = []
            if later:
                dropped.append(f"{later} record(s) of steps after {step} (they are trained and logged again)")
            if duplicate:
                dropped.append(f"{duplicate} repeated record(s) of earlier steps (the last of each is kept)")
            if unreadable:
                dropped.append(f"{unreadable} unreadable line{'s' if unreadable > 1 else ''} (a write cut short)")
            if dropped:
                print(f"[i2v] metrics.jsonl: dropped {' and '.join(dropped)}", flush=True)
        self._begin(step)

    def _begin(self, step: int) -> None:
        self.run_start, self.start_step = time.perf_counter(), step
        self._reset()

    def _reset(self) -> None:
        self.window = {"time": 0.0, "wait": 0.0, "steps": 0, "flops": 0, "hw_flops": 0, "tokens": 0}

    def record_batch(self, batch: dict) -> None:
        """A micro-batch that went through forward and backward."""
        b, frames, _, height, width = batch["video_latents"].shape
        key = (frames, height, width, batch["prompt_embeds"].shape[1])
        if key not in self.flops_by_shape:
            self.flops_by_shape[key] = training_flops(self.model_config, frames, height, width, text_tokens=key[3],
                                                      gradient_checkpointing=self.checkpointing)
        f, sp = self.flops_by_shape[key], self.cfg.parallel.sequence_parallel_size
        self.window["flops"] += b * f.model / sp
        self.window["hw_flops"] += b * f.hardware / sp
        self.window["tokens"] += b * f.tokens

    def record_step(self, seconds: float, data_wait: float) -> None:
        self.window["time"] += seconds
        self.window["wait"] += data_wait
        self.window["steps"] += 1

    def log(self, step: int, local_loss, engine, counters: dict) -> None:
        """One logged step; `local_loss` is this rank's mean loss (a device tensor or a float), `counters`
        are extra integer fields (position, skipped, bad samples).

        One host read in all: the loss, the window's FLOPs and tokens and the remote retries are summed
        over the ranks in one all-reduce of one device tensor, read together with the gradient norm."""
        cfg, env, window = self.cfg, self.env, self.window
        loss_t = torch.as_tensor(local_loss, dtype=torch.float64, device=env.device).reshape(1)
        host = torch.tensor([counters.get("remote_retries", 0), window["flops"], window["hw_flops"], window["tokens"]],
                            dtype=torch.float64)
        summed = torch.cat([loss_t, host.to(env.device, non_blocking=True)])
        if dist.is_initialized():
            dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        grad_norm = engine.get_global_grad_norm()
        norm_t = torch.as_tensor(float("nan") if grad_norm is None else grad_norm, dtype=torch.float64,
                                 device=env.device).reshape(1)
        values = torch.cat([summed / env.world_size, norm_t]).tolist()  # the one read
        loss, retries, flops, hw_flops, tokens, grad_norm = values
        # Remote retries happen on whichever rank reads the shard: the record holds all ranks' total.
        counters = {**counters, "remote_retries": round(retries * env.world_size)}
        self._reset()
        lr = engine.get_lr()[0]
        step_time = window["time"] / max(1, window["steps"])
        dp_size, samples = self.run.dp_size, self.run.global_batch_size  # an SP group trains one micro-batch
        samples_per_s = samples / step_time if step_time > 0 else float("nan")
        wait_frac = window["wait"] / window["time"] if window["time"] > 0 else 0.0
        if not env.is_main:
            return
        tflops = flops / window["time"] / 1e12 if window["time"] > 0 else float("nan")
        tokens_per_s = tokens * dp_size / window["time"] if window["time"] > 0 else float("nan")
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "samples_per_s": samples_per_s,
                  "step_time_s": step_time, "data_wait_frac": wait_frac, "tflops": tflops,
                  "tokens_per_s": tokens_per_s, "world_size": env.world_size, **counters}
        scalars = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                   "perf/samples_per_s": samples_per_s, "perf/step_time_s": step_time,
                   "perf/data_wait_frac": wait_frac, "perf/tflops_per_s": tflops, "perf/tokens_per_s": tokens_per_s,
                   "data/bad_samples": counters.get("bad_samples", 0),
                   "data/remote_retries": counters["remote_retries"],
                   "train/skipped_micro_batches": counters.get("skipped", 0)}
        if self.peak_tflops:
            record["mfu"] = scalars["perf/mfu"] = tflops / self.peak_tflops
            hw_tflops = hw_flops / window["time"] / 1e12 if window["time"] > 0 else float("nan")
            record["hfu"] = scalars["perf/hfu"] = hw_tflops / self.peak_tflops
        if env.device.type == "cuda":
            record["peak_mem_gb"] = scalars["perf/peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            record["peak_mem_reserved_gb"] = scalars["perf/peak_mem_reserved_gb"] = \
                torch.cuda.max_memory_reserved() / 2**30
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        done = step - self.start_step
        elapsed = time.perf_counter() - self.run_start
        eta = elapsed / done * (cfg.train.max_steps - step) if done else float("nan")
        mfu = f" (MFU {record['mfu']:.1%})" if "mfu" in record else ""
        print(f"[i2v] step {step}/{cfg.train.max_steps} | loss {loss:.5f} | lr {lr:.2e} | grad {grad_norm:.3f} | "
              f"{samples_per_s:.1f} samples/s | {tflops:.3g} TFLOP/s{mfu} | data wait {wait_frac:.0%} | ETA {hms(eta)}",
              flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class KeyLog:
    """data.log_keys: this rank's trained micro-batches, one JSON line each, in
    output_dir/keys-rank<R>.jsonl: {"step", "position", "keys", "epochs"}. Appended as trained, so a
    resumed run appends the steps it trains again after its checkpoint."""

    def __init__(self, output_dir: str, rank: int):
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, f"keys-rank{rank}.jsonl")

    def write(self, step: int, position: int, batch: dict) -> None:
        record = {"step": step, "position": position, "keys": batch.get("keys", []), "epochs": batch.get("epochs", [])}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def trim_metrics(path: str, step: int) -> tuple[int, int, int]:
    """Rewrite metrics.jsonl with one record per step up to `step`, in step order, kept verbatim.

    Returns the numbers of records dropped for a later step, of repeated records of a step (files
    written before this trimming existed; the last one is kept, as it belongs to the run that went
    on) and of unreadable lines (a process killed in the middle of a write leaves part of a line).
    The file is replaced atomically, and left untouched when nothing changes.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return 0, 0, 0
    kept: dict[int, str] = {}
    later = duplicate = unreadable = 0
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
            s = json.loads(text)["step"]
            if type(s) is not int:
                raise TypeError(f"step is {s!r}")
        except (ValueError, KeyError, TypeError):  # includes UnicodeDecodeError and JSONDecodeError
            unreadable += 1
            continue
        if s > step:
            later += 1
        else:
            duplicate += s in kept
            kept[s] = text
    new = "".join(kept[s] + "\n" for s in sorted(kept))
    if new.encode("utf-8") != data:
        write_text_atomic(path, new)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
    return later, duplicate, unreadable


def hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--:--"
    s = int(seconds)
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"
