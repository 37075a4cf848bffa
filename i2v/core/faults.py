"""Fault injection for tests: make a chosen rank fail at a chosen step and point.

Set `I2V_FAULT=RANK:STEP:POINT[:ACTION]`, several separated by commas. POINT is one of
`after_backward`, `before_step`, `mid_checkpoint`, `nan_loss`; ACTION is `exit` (hard
`os._exit(99)`, like SIGKILL: no cleanup, no flush), `kill` (SIGKILL to itself) or `raise`
(an exception). `nan_loss` needs no action: the trainer replaces that rank's loss with NaN.
Unset, this module does nothing.
"""

from __future__ import annotations

import os
import signal

POINTS = ("after_backward", "before_step", "mid_checkpoint", "nan_loss")


class InjectedFault(RuntimeError):
    pass


def _parse() -> list[tuple[int, int, str, str]]:
    spec = os.environ.get("I2V_FAULT", "").strip()
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        if len(parts) not in (3, 4) or parts[2] not in POINTS:
            raise ValueError(f"I2V_FAULT: bad entry {item!r}; expected RANK:STEP:POINT[:ACTION], POINT in {POINTS}")
        faults.append((int(parts[0]), int(parts[1]), parts[2], parts[3] if len(parts) == 4 else "exit"))
    return faults


def is_armed(point: str, rank: int, step: int) -> bool:
    return any(r == rank and s == step and p == point for r, s, p, _ in _parse())


def maybe_fault(point: str, rank: int, step: int) -> None:
    for r, s, p, action in _parse():
        if (r, s, p) != (rank, step, point):
            continue
        if action == "raise":
            raise InjectedFault(f"injected fault at rank {rank}, step {step}, {point}")
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(99)
