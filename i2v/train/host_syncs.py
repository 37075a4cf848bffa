"""Count the device-to-host synchronisations of a piece of training code, and say who made each one.

A host sync stalls the CPU until the GPU has drained its queue, so the next kernels are launched
late. On CUDA it comes from a scalar read of a device tensor (`.item()`, `bool(t)`, `float(t)`,
`.tolist()`: aten `_local_scalar_dense`), a copy from the device to the host (`.cpu()`, `.to("cpu")`)
and an explicit synchronize.

The counter runs on a CPU machine too, where every tensor is a host tensor and nothing really
syncs. It then counts what *would* sync on CUDA: every scalar read, except reads of tensors that
live on the host on a GPU machine too. Those are (1) the draws of a CPU `torch.Generator` and
every tensor computed from such draws alone (the counter follows them through the ops it sees:
e.g. `if drop_text.any():` on a dropout mask drawn on the host) and (2) anything read by the data
loader (`i2v/data/`, `torch/utils/data/`). Device-to-host copies are counted only where the source
is really on an accelerator, since on a CPU machine they cannot be told apart from host copies. Each sync is attributed to the innermost frame of the stack that lies in
i2v (`owner == "i2v"`) or in DeepSpeed (`"deepspeed"`), with that frame's file and line; frames of
torch and of this module are looked through. A sync reached from neither is `"other"`.

    with HostSyncCounter() as syncs:
        trainer.train()
    print(syncs.summary())        # {"i2v": 0, "deepspeed": 3, ...}
    for s in syncs.events: print(s)

`bench/` uses it to report the syncs of a timed step beside its time.
"""

from __future__ import annotations

import os
import traceback
from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

_I2V_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../i2v
_HOST_ONLY = (os.path.join(_I2V_ROOT, "data") + os.sep,  # code that reads host tensors only
              os.sep + os.path.join("torch", "utils", "data") + os.sep)
_THIS = os.path.abspath(__file__)
_DEEPSPEED = os.sep + "deepspeed" + os.sep
_TORCH = os.sep + "torch" + os.sep

_aten = torch.ops.aten
_SCALAR_READS = {_aten._local_scalar_dense.default}
_COPIES = {_aten._to_copy.default, _aten.copy_.default, _aten.copy.default}


@dataclass(frozen=True)
class Sync:
    owner: str  # "i2v", "deepspeed" or "other"
    kind: str  # "scalar" (.item(), bool(t), .tolist()), "copy" (device to host) or "synchronize"
    where: str  # file:line of the innermost i2v or DeepSpeed frame
    code: str  # that line's source text

    def __str__(self) -> str:
        return f"{self.owner:9s} {self.kind:11s} {self.where}  {self.code}"


def _short(path: str) -> str:
    for marker in (_DEEPSPEED, os.sep + "i2v" + os.sep):
        i = path.rfind(marker)
        if i >= 0:
            return path[i + 1:]
    return path


def attribute(stack: list[traceback.FrameSummary] | None = None) -> tuple[str, str, str] | None:
    """(owner, file:line, code) of the innermost i2v or DeepSpeed frame of `stack` (the caller's
    stack when None), or None when that frame is host-only code (the data loader). A DeepSpeed
    helper's line is followed by its caller's (`utils.py:233 < stage_1_and_2.py:3043`)."""
    stack = stack if stack is not None else traceback.extract_stack()
    found = None
    for frame in reversed(stack):
        path = os.path.abspath(frame.filename)
        if path == _THIS:
            continue
        if any(h in path for h in _HOST_ONLY):
            return None if found is None else found
        owner = "i2v" if path.startswith(_I2V_ROOT + os.sep) else "deepspeed" if _DEEPSPEED in path else None
        if owner is None:
            continue
        where = f"{_short(path)}:{frame.lineno}"
        if found is None:
            found = (owner, where, (frame.line or "").strip())
            if owner == "i2v":
                return found
        else:  # the DeepSpeed helper's caller
            return found[0], f"{found[1]} < {where}", found[2]
    if found is not None:
        return found
    inner = next((f for f in reversed(stack) if os.path.abspath(f.filename) != _THIS and _TORCH not in f.filename),
                 None)
    if inner is None:
        return "other", "?", ""
    return "other", f"{inner.filename}:{inner.lineno}", (inner.line or "").strip()


class HostSyncCounter(TorchDispatchMode):
    """A dispatch mode that records every (would-be) device-to-host sync while it is active; it also
    counts calls of DeepSpeed's accelerator `synchronize` and of `torch.cuda.synchronize`."""

    def __init__(self):
        super().__init__()
        self.events: list[Sync] = []
        self._patched: list = []
        self._host = WeakIdKeyDictionary()  # tensors that live on the host on a GPU machine too

    def _record(self, kind: str) -> None:
        who = attribute()
        if who is not None:
            self.events.append(Sync(who[0], kind, who[1], who[2]))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SCALAR_READS:
            if args[0] not in self._host:
                self._record("scalar")
        elif func in _COPIES and _to_host(func, args, kwargs):
            self._record("copy")
        out = func(*args, **kwargs)
        if self._host_origin(args, kwargs):
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                    self._host[t] = True
        return out

    def _host_origin(self, args, kwargs) -> bool:
        """Whether an op's result is a host tensor by origin: drawn from a CPU generator, or computed
        from such tensors only (python numbers aside)."""
        gen = kwargs.get("generator")
        if isinstance(gen, torch.Generator):
            return gen.device.type == "cpu"
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        return bool(tensors) and all(t in self._host for t in tensors)

    def __enter__(self):
        self._wrap_synchronize()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for owner, name, original in reversed(self._patched):
                setattr(owner, name, original)
            self._patched.clear()

    def _wrap_synchronize(self) -> None:
        # `.tolist()` and `.cpu()` of a host tensor read its memory without dispatching an op (on CUDA
        # they copy first, which the mode sees): counted here unless the tensor is a host tensor by origin.
        for name in ("tolist", "cpu"):
            original = getattr(torch.Tensor, name)

            def read(t, *a, _original=original, **k):
                if t.device.type == "cpu" and t not in self._host:
                    self._record("scalar")
                return _original(t, *a, **k)

            setattr(torch.Tensor, name, read)
            self._patched.append((torch.Tensor, name, original))
        targets = [(torch.cuda, "synchronize")]
        try:
            from deepspeed.accelerator import get_accelerator

            targets.append((get_accelerator(), "synchronize"))
        except ImportError:
            pass
        for owner, name in targets:
            original = getattr(owner, name)

            def counted(*a, _original=original, **k):
                self._record("synchronize")
                return _original(*a, **k)

            setattr(owner, name, counted)
            self._patched.append((owner, name, original))

    # -- reading the record --------------------------------------------------------

    def summary(self) -> dict[str, int]:
        """Syncs by owner: {"i2v": n, "deepspeed": m, "other": k, "total": n + m + k}."""
        c = Counter(e.owner for e in self.events)
        return {"i2v": c["i2v"], "deepspeed": c["deepspeed"], "other": c["other"], "total": len(self.events)}

    def by_site(self, owner: str | None = None) -> Counter:
        """How many syncs each source line made (of one owner, or of all)."""
        return Counter(f"{e.owner} {e.where}  {e.code}" for e in self.events if owner in (None, e.owner))

    def report(self) -> str:
        lines = [f"{n:4d}  {site}" for site, n in sorted(self.by_site().items())]
        return "\n".join([f"host syncs: {self.summary()}", *lines])


def _to_host(func, args, kwargs) -> bool:
    """A copy whose source is on an accelerator and whose result is on the host."""
    src = args[1] if func is _aten.copy_.default else args[0]
    if not isinstance(src, torch.Tensor) or src.device.type in ("cpu", "meta"):
        return False
    if func is _aten.copy_.default:
        return args[0].device.type == "cpu"
    device = kwargs.get("device")
    return device is not None and torch.device(device).type == "cpu"


# -- the syncs of the training loop ----------------------------------------------------------------

def measure_trainer(trainer, steps: int = 3, warmup: int = 2) -> dict:
    """The syncs per optimizer step of `trainer`'s loop, split into non-logging and logging steps.

    Trains `warmup` steps uncounted (first-step set-up: lazy optimizer state, kernel caches), then
    counts two windows: `steps` steps where only the last one logs, and one more step that logs. The
    logging step's syncs are the second window's; a non-logging step's are the first window's less
    one logging step, divided by `steps - 1`. A window runs the whole loop (its start, the data it
    draws, its end), so a sync outside the steps would show up too. Checkpoints and validation must
    be off in `trainer.cfg` (they sync by nature); `train.log_every` is set here.
    """
    cfg = trainer.cfg
    if cfg.checkpoint.every_steps or cfg.checkpoint.save_at_end or cfg.validation.every_steps:
        raise ValueError("measure_trainer: turn checkpoints (every_steps, save_at_end) and validation off")
    cfg.train.log_every = 10**9
    cfg.train.max_steps = trainer.step + warmup
    trainer.train()
    windows = []
    for n in (steps, 1):
        cfg.train.max_steps = trainer.step + n
        with HostSyncCounter() as counter:
            trainer.train()
        windows.append(counter)
    many, one = windows
    result = {"logging": {**one.summary(), "sites": dict(one.by_site())}}
    non_logging = {}
    for owner in ("i2v", "deepspeed", "other", "total"):
        extra = many.summary()[owner] - one.summary()[owner]
        non_logging[owner] = extra / (steps - 1) if steps > 1 else float("nan")
    sites = many.by_site()
    sites.subtract(one.by_site())
    non_logging["sites"] = {k: v / (steps - 1) for k, v in sites.items() if v}
    result["non_logging"] = non_logging
    from i2v.train.optim import optimizer_name

    why = trainer.steps.why_eager
    result["nan_guard"] = "deferred" if why is None else f"eager ({why})"
    result["optimizer"] = optimizer_name(trainer.engine)
    return result


def main(argv=None) -> None:
    """python -m i2v.train.host_syncs --config configs/tiny.yaml data.latent_shards=DIR [key=value ...]"""
    import json

    from i2v.config import parse_args
    from i2v.core.distributed import init_distributed, shutdown
    from i2v.train.trainer import Trainer

    cfg, _ = parse_args(argv)
    cfg.checkpoint.every_steps, cfg.checkpoint.save_at_end, cfg.checkpoint.resume = 0, False, False
    cfg.validation.every_steps = 0
    env = init_distributed()
    trainer = Trainer(cfg, env)
    try:
        result = measure_trainer(trainer)
    finally:
        trainer.close()
    if env.is_main:
        print(json.dumps(result, indent=1))
    shutdown()


if __name__ == "__main__":
    main()
