"""The micro-batches of one optimizer step, and the guard that drops a micro-batch whose loss is not finite.

What the guard promises: a micro-batch whose loss is not finite on any rank (or that has no usable
sample) is dropped on every rank; nothing of it reaches the parameters or the optimizer state; it is
counted (`Trainer.skipped`) and replaced by the next micro-batch of the data order, so a step always
trains `grad_accum_steps` micro-batches; `train.max_consecutive_skips` dropped in a row stop the run.

Two ways to keep it, chosen once per run by `deferred_reason`:

- **Eager** (any engine): after each forward, the ranks all-reduce "is my loss finite" and read it
  on the host before backward, so a bad micro-batch never runs backward. One host sync per
  micro-batch, and a collective. Used where DeepSpeed's step would apply a NaN gradient or count a
  skipped step against the loss scale: ZeRO-0, fp16, optimizer offload.
- **Deferred** (ZeRO-1/2/3 on fp32 or bf16 weights, no optimizer offload: the engines whose step
  skips itself on a non-finite gradient norm): nothing is read per micro-batch. A bad micro-batch's loss is
  multiplied by NaN (a finite one by 1.0, which changes no bit), so its backward turns every gradient
  it touches into NaN. DeepSpeed reduces the gradients across ranks and checks the global norm before
  the optimizer step, a host read it makes anyway; on NaN it skips the step, clears the gradients and
  leaves parameters, optimizer state and LR schedule as they were (`engine.optimizer.overflow`, a host
  bool). Only then, on this rare path, the ranks read which micro-batches were bad (one all-reduce),
  undo DeepSpeed's step counters, count the skips in draw order and run the step again: the good
  micro-batches of the discarded attempt once more (same data, same index, same parameters: the same
  gradients) and one new draw per dropped one. The step then trains the same micro-batches in the same
  order as the eager guard would, so the two give the same result. An empty micro-batch (no usable
  sample) still runs a forward and backward, on the last micro-batch this rank trained, multiplied by
  NaN: every rank must run its backward, whose gradient reductions are collectives.

  The price: a bad micro-batch costs its backward and the step's other micro-batches once more, and
  for bf16 DeepSpeed's `check_grad_overflow` (one host read of its own) is turned on. Until a process
  has trained a step (on every rank alike), the guard is eager, so that every rank has a trained
  micro-batch to stand in for an empty one. A step DeepSpeed skips with no bad loss anywhere (a gradient overflow of a finite loss) counts
  as a step, as it did before. Nothing is read on the host but on that rare path, so the loss of a
  steady-state step is not known on the host until a logging step reads it.

Why not fully on the device: a zero-weighted backward of a NaN micro-batch still gives NaN gradients
(0 x NaN), ZeRO-2 reduces them into its partitions during backward, and how many micro-batches to draw
to replace a dropped one is a host decision; DeepSpeed's norm check is a host read already paid for.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from i2v.core.faults import is_armed, maybe_fault


def deferred_reason(engine) -> str | None:
    """None when `engine`'s optimizer step skips itself on a non-finite gradient norm (the deferred
    guard is then safe), else why not (the eager guard is used)."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    if isinstance(opt, DeepSpeedZeroOptimizer):  # ZeRO-1/2
        if opt.cpu_offload:
            return "optimizer offload"
        if not opt.compute_grad_norm:
            return "zero_optimization.compute_grad_norm is off"
        if opt.dtype == torch.bfloat16 and not opt.check_grad_overflow:
            return "bf16 without bf16.check_grad_overflow"
    elif isinstance(opt, DeepSpeedZeroOptimizer_Stage3):  # its step checks the norm at any precision
        if opt.offload_optimizer:
            return "optimizer offload"
    else:
        return f"{type(opt).__name__} does not skip a step on a non-finite gradient"
    if opt.dtype not in (torch.float32, torch.bfloat16) or opt.loss_scaler.dynamic:
        return "fp16's dynamic loss scale (a skipped step would lower the scale)"
    return None


class StepRunner:
    """Trains the micro-batches of one optimizer step for `trainer` and takes the step."""

    def __init__(self, trainer):
        self.tr = trainer
        self.why_eager = deferred_reason(trainer.engine)
        self.consecutive = 0  # micro-batches dropped in a row
        self.template = None  # the last micro-batch this rank trained: the stand-in for an empty one

    def run(self, data, first: bool) -> tuple[list, float]:
        """One optimizer step; returns the trained micro-batches' losses (device tensors) and the
        seconds spent waiting for data. `first`: the first step of a loop (the count of skips in a row
        starts again)."""
        if first:
            self.consecutive = 0
        # Until this process has trained a micro-batch (on every rank alike: a step trains one on each),
        # there is no stand-in for an empty one.
        if self.why_eager is not None or self.template is None:
            return self._eager(data)
        return self._deferred(data)

    # -- shared parts ------------------------------------------------------------------------------

    def _draw(self, data) -> tuple[dict, int, float]:
        tr = self.tr
        tw = time.perf_counter()
        batch = next(data)
        wait = time.perf_counter() - tw
        tr.bad_by_worker[batch["bad"]["worker"]] = batch["bad"]
        # This micro-batch's global position keys its noise, timesteps and dropout.
        index = tr.position + tr.layout.dp_rank
        tr.position += tr.layout.dp_size
        if tr.keys is not None:
            tr.keys.write(tr.step + 1, index, batch)
        return batch, index, wait

    def _skipped(self) -> None:
        self.consecutive += 1
        self.tr._count_skip(self.consecutive)

    def _trained(self, batch, loss, losses: list) -> None:
        tr = self.tr
        losses.append(tr.layout.micro_batch_loss(loss))
        tr.telemetry.record_batch(batch)
        self.template = batch

    def _finish(self) -> None:
        maybe_fault("before_step", self.tr.env.rank, self.tr.step)
        self.tr.engine.step()

    # -- eager: one host read per micro-batch ------------------------------------------------------

    def _eager(self, data) -> tuple[list, float]:
        tr = self.tr
        losses, attempts, wait = [], 0, 0.0
        while len(losses) < tr.resolved.grad_accum_steps:
            batch, index, w = self._draw(data)
            wait += w
            loss = torch.tensor(float("nan")) if batch.get("empty") else tr.objective.loss(tr.engine, batch, index)
            if attempts == 0 and is_armed("nan_loss", tr.env.rank, tr.step):
                loss = loss * float("nan")
            attempts += 1
            if _any_rank(~torch.isfinite(loss.detach()), tr.env.device).item():  # the one read
                # Dropped on every rank before backward: parameters and optimizer state stay untouched.
                self._skipped()
                continue
            self.consecutive = 0
            tr.engine.backward(loss)
            maybe_fault("after_backward", tr.env.rank, tr.step)
            self._trained(batch, loss, losses)
            if len(losses) < tr.resolved.grad_accum_steps:
                tr.engine.step()  # a no-op for the optimizer until the accumulation boundary
        self._finish()
        return losses, wait

    # -- deferred: bad micro-batches poison the gradient, DeepSpeed's norm check finds them --------

    def _deferred(self, data) -> tuple[list, float]:
        tr, gas = self.tr, self.tr.resolved.grad_accum_steps
        wait, attempts = 0.0, 0
        again: list = []  # (batch, index) trained in a discarded attempt: run once more
        while True:
            entries, flags, losses = [], [], []
            counters = _engine_counters(tr.engine)
            for k in range(gas):
                fresh = k >= len(again)
                if fresh:
                    batch, index, w = self._draw(data)
                    wait += w
                else:
                    batch, index = again[k]
                empty = bool(batch.get("empty"))
                loss = tr.objective.loss(tr.engine, self.template if empty else batch, index)
                if empty:
                    loss = loss * float("nan")
                if fresh and attempts == 0 and is_armed("nan_loss", tr.env.rank, tr.step):
                    loss = loss * float("nan")
                attempts += fresh
                finite = torch.isfinite(loss.detach())
                flags.append(~finite)
                # 1.0 where finite (no bit changes), NaN where not: the backward spreads it to the gradients.
                tr.engine.backward(loss * torch.where(finite, 1.0, float("nan")).to(loss.dtype))
                maybe_fault("after_backward", tr.env.rank, tr.step)
                entries.append((batch, index, fresh, loss))
                if k < gas - 1:
                    tr.engine.step()  # a no-op for the optimizer until the accumulation boundary
            self._finish()
            if not getattr(tr.engine.optimizer, "overflow", False):
                bad = None
            else:  # the step was skipped: was it one of ours? (a rare path; it may read on the host)
                bad = [bool(b) for b in _any_rank(torch.stack(flags), tr.env.device).tolist()]
            if not bad or not any(bad):
                for batch, _, fresh, loss in entries:
                    self.consecutive = 0 if fresh else self.consecutive
                    self._trained(batch, loss, losses)
                return losses, wait
            _restore(tr.engine, counters)  # DeepSpeed counted the step it skipped: it is trained again
            again = []
            for (batch, index, fresh, _), b in zip(entries, bad):
                if b:
                    self._skipped()
                else:
                    if fresh:
                        self.consecutive = 0
                    again.append((batch, index))


def _any_rank(flags: torch.Tensor, device) -> torch.Tensor:
    """Element-wise OR of bool `flags` over all ranks, on the device (nothing read on the host)."""
    t = flags.to(device=device, dtype=torch.float32).reshape(-1)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t > 0


_ENGINE_COUNTERS = ("global_steps", "skipped_steps", "global_samples", "micro_steps")


def _engine_counters(engine) -> dict:
    return {k: getattr(engine, k) for k in _ENGINE_COUNTERS}


def _restore(engine, counters: dict) -> None:
    for k, v in counters.items():
        setattr(engine, k, v)
