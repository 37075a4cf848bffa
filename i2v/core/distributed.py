"""Process-group setup that works the same under `deepspeed`, `torchrun` and plain `python`.

Launchers set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a plain `python` run
gets single-process values here, so DeepSpeed never goes looking for MPI.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port free on this host now, for a one-box rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float = 1800.0) -> DistEnv:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on CUDA)."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


@contextlib.contextmanager
def all_ranks_agree(env: DistEnv, what: str = "setup"):
    """Run a block of rank-local checks; if any rank raises a user error there, every rank raises it.

    A rank that fails on its own (a file its node cannot see, say) would otherwise exit while the
    others walk on into the next collective and wait there until the process-group timeout. Every
    rank must enter this block, and nothing inside may be a collective. The failing rank re-raises
    its own error; the others raise the same kind of error, naming that rank and its message (sent
    as bytes in a tensor, never pickled).
    """
    from i2v.core import errors

    failure: errors.I2VError | None = None
    try:
        yield
    except errors.I2VError as e:
        failure = e
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        if failure is not None:
            raise failure
        return
    message = b""
    if failure is not None:
        message = f"{type(failure).__name__}\0{failure}".encode()[:_MESSAGE_BYTES]
    local = torch.zeros(_MESSAGE_BYTES + 1, dtype=torch.uint8)
    local[0] = 1 if failure is not None else 0
    local[1:1 + len(message)] = torch.frombuffer(bytearray(message), dtype=torch.uint8) if message else local[1:1]
    device = env.device if dist.get_backend() == "nccl" else torch.device("cpu")
    gathered = [torch.empty_like(local, device=device) for _ in range(world)]
    dist.all_gather(gathered, local.to(device))
    if failure is not None:
        raise failure
    for rank, t in enumerate(gathered):
        t = t.cpu()
        if t[0]:
            kind, _, text = bytes(t[1:].tolist()).rstrip(b"\0").decode(errors="replace").partition("\0")
            cls = getattr(errors, kind, None)
            cls = cls if isinstance(cls, type) and issubclass(cls, errors.I2VError) else errors.I2VError
            raise cls(f"rank {rank} failed during {what}: {text}")


_MESSAGE_BYTES = 2048


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown(clean: bool = True) -> None:
    """Tear the process group down before the interpreter exits.

    Left to interpreter teardown, a communication thread can still be running when its C++ object
    is destroyed, which aborts the process ("terminate called without an active exception") after
    a run that finished fine. On a clean exit a barrier first lets every rank's queued asynchronous
    work (ZeRO-3 prefetches, bucket reductions) finish; after an error it is skipped, since a failed
    peer would never reach it.
    """
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
