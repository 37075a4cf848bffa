"""Every rank stops at the same step boundary when any rank was told to stop (SIGTERM, SIGUSR1, Ctrl-C).

The ranks agree on the largest signal code with an all-reduce, but not on the accelerator and not
waited for at once: each step boundary starts an asynchronous all-reduce of this rank's code, over a
gloo group of CPU tensors, and reads the one started at the previous boundary, which has long
finished by then. Nothing of it touches the GPU's queue, so the steady-state step has no host sync
for it, and every rank reads the same agreed value at the same boundary: the run stops one step
after the signal instead of at once. At the last step of the loop the all-reduce is waited for on the
spot, so a signal during the final step is still honoured. A single process needs no agreement.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class StopAgreement:
    def __init__(self):
        self.group = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            self.group = dist.new_group(backend="gloo")  # every rank calls this, in the same order
        self._pending = None  # (work, tensor) of the all-reduce started at the previous boundary

    def poll(self, local_code: int, last: bool = False) -> int:
        """At a step boundary, on every rank: the code all ranks agreed on (0: go on). `last` (the
        loop's final step) waits for this boundary's agreement too."""
        agreed = self._collect()
        if agreed or self.group is None:
            return agreed or local_code
        t = torch.tensor([local_code], dtype=torch.int64)
        self._pending = (dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group, async_op=True), t)
        return self._collect() if last else 0

    def _collect(self) -> int:
        if self._pending is None:
            return 0
        work, t = self._pending
        self._pending = None
        work.wait()
        return int(t.numpy()[0])  # a host tensor from gloo: reading it waits for no device
