"""Count what a GPU would do for a piece of PyTorch, without a GPU: kernel launches, HBM bytes, FLOPs.

`TrafficCounter` is a TorchDispatchMode. Run a module on the meta device (custom kernels dispatch to
their fake implementations) inside it, and it sees every aten op at the real shapes after autograd,
so forward, checkpoint recompute and backward all pass through it. It sorts each op into one of four
kinds and keeps totals per phase ("forward", "recompute", "backward"; the caller moves the phase,
see `TrafficCounter.phase` and `recompute_marker`).

The rules (what the figures mean):

- Launches. Every op counts as one kernel launch except
  * views and metadata-only ops: any op whose schema says its output aliases an input without a
    write (view, transpose, permute, expand, t, as_strided, unsqueeze, split/chunk/slice/select,
    unbind, detach, alias, ...), plus `_unsafe_view`, `_reshape_alias`, `lift_fresh`, `set_`, `resize_`;
  * allocations: `empty*`, `empty_strided`, `new_empty*` (memory, not a kernel);
  * `_local_scalar_dense` (a device-to-host sync), counted apart as `syncs`.
  A custom op (namespace `i2v`) counts as one launch, whatever it runs inside, and its bytes are those of
  any op: the unique elements of its tensor inputs read plus its outputs written (what a fused kernel
  that reads each input once and writes each output once moves).
- Kinds. `gemm`: mm, addmm, bmm, baddbmm, addbmm, addmv, mv, dot, _scaled_mm (linear and matmul reach the
  dispatcher as these). `attention`: our `i2v::flash_attention_*` ops and the SDPA kernels
  (`_scaled_dot_product_{flash,efficient,cudnn}_attention[_backward]`, `_flash_attention_*`,
  `_efficient_attention_*`). `sync`: `_local_scalar_dense`. Everything else that launches is `other`
  (elementwise, reductions, norms, copies, casts, fills, cat, ..., and the other `i2v` custom ops such as
  `i2v::qk_norm_rope_fwd/bwd`).
- Bytes of an op: unique elements read plus elements written, each times its element size.
  * Read: every tensor argument once per distinct view (same storage, offset, shape and strides
    count once, so `x * x` reads x once), with the number of distinct elements that view addresses: a
    dimension of stride 0 (a broadcast) adds nothing, so an expanded bias counts its real elements
    once. Views of one storage are summed and capped at the storage's size. The destination of an
    overwrite (`copy_`, `fill_`, `zero_`, `*_` random fills, an `out=` argument) is not read.
  * Written: every tensor the op writes, i.e. its outputs and the arguments it mutates, once each
    (an in-place op that returns its argument is one write).
  Bytes are kept for every kind, and reported as `bytes` (the non-GEMM, non-attention traffic: what
  fusion can remove), `gemm_bytes` and `attention_bytes`.
- FLOPs. GEMMs: 2·M·N·K per product (batched: times the batch; the bias add of addmm is not counted).
  Attention forward: 4·B·H·Sq·Sk·D (QK^T and PV); backward: twice that, 8·B·H·Sq·Sk·D, the model-FLOP
  convention of `i2v.model.flops` (a flash kernel's recompute of the scores is not counted).
  Other ops: no FLOPs.
- Regions. `region_marker(name, fn)` wraps a function so that its ops count, in addition, under
  `regions[name]` of the phase: in the forward (and recompute) while it runs, and in the backward
  for the autograd nodes it created (found by walking its outputs' graph back to its inputs').
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
PHASES = ("forward", "recompute", "backward")

_NO_KERNEL = {
    "_unsafe_view", "_reshape_alias", "lift_fresh", "set_", "resize_", "alias", "detach",
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted",
}
_GEMM = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "addmv", "mv", "dot", "_scaled_mm"}
_SDPA_FWD = {"_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
             "_flash_attention_forward", "_efficient_attention_forward"}
_SDPA_BWD = {name + "_backward" for name in _SDPA_FWD} | {"_flash_attention_backward",
                                                          "_efficient_attention_backward"}
_OVERWRITE = {"copy_", "fill_", "zero_", "normal_", "uniform_", "bernoulli_", "random_", "exponential_"}


def _name(func) -> str:
    return func._schema.name.split("::", 1)[1]


def _is_view(func) -> bool:
    """The schema says an output aliases an input and nothing is written: a view or metadata op."""
    schema = func._schema
    aliased = any(r.alias_info is not None for r in schema.returns)
    written = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
    return aliased and not written


def kind_of(func) -> str:
    """'view', 'alloc', 'sync', 'gemm', 'attention' or 'other' (see the module docstring)."""
    ns = func.namespace
    name = _name(func)
    if ns == "i2v":
        return "attention" if name.startswith("flash_attention") else "other"
    if name == "_local_scalar_dense":
        return "sync"
    if name.startswith("empty") or name.startswith("new_empty"):
        return "alloc"
    if name in _NO_KERNEL or _is_view(func):
        return "view"
    if name in _GEMM:
        return "gemm"
    if name in _SDPA_FWD or name in _SDPA_BWD:
        return "attention"
    return "other"


def _view_key(t: torch.Tensor):
    return (t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def distinct_elements(t: torch.Tensor) -> int:
    """Elements a view addresses: a stride-0 (broadcast) dimension contributes one."""
    if t.numel() == 0:
        return 0
    return math.prod(n for n, s in zip(t.shape, t.stride()) if s != 0)


def _storage_id(t: torch.Tensor):
    return t.untyped_storage()._cdata


def tensor_bytes(tensors) -> int:
    """Unique bytes of a list of tensors: distinct views once, each storage capped at its size."""
    per_storage: dict = {}
    for t in tensors:
        views = per_storage.setdefault(_storage_id(t), {"size": t.untyped_storage().nbytes(), "views": {}})
        views["views"].setdefault(_view_key(t), distinct_elements(t) * t.element_size())
    return sum(min(v["size"], sum(v["views"].values())) if v["size"] else sum(v["views"].values())
               for v in per_storage.values())


def _gemm_flops(name: str, args, out) -> int:
    if name in ("mm", "addmm", "_scaled_mm"):
        a, b = (args[0], args[1]) if name != "addmm" else (args[1], args[2])
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]
    if name in ("bmm", "baddbmm"):
        a, b = (args[0], args[1]) if name == "bmm" else (args[1], args[2])
        return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    if name == "addbmm":
        a, b = args[1], args[2]
        return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    if name == "addmv":
        return 2 * args[1].shape[0] * args[1].shape[1]
    if name == "mv":
        return 2 * args[0].shape[0] * args[0].shape[1]
    if name == "dot":
        return 2 * args[0].shape[0]
    raise AssertionError(name)


def _attention_flops(func, args) -> int:
    name = _name(func)
    if func.namespace == "i2v":
        q, k = (args[0], args[1]) if name == "flash_attention_fwd" else (args[1], args[2])
    elif name in _SDPA_BWD:
        q, k = args[1], args[2]  # (grad_out, query, key, ...)
    else:
        q, k = args[0], args[1]
    if q.dim() == 4 and name.startswith("_scaled_dot_product") or func.namespace == "i2v":
        b, h, sq, d = q.shape
        sk = k.shape[2]
    else:  # _flash_attention_* / _efficient_attention_*: [B, S, H, D]
        b, sq, h, d = q.shape
        sk = k.shape[1]
    fwd = 4 * b * h * sq * sk * d
    backward = name.endswith("_backward") or name == "flash_attention_bwd"
    return 2 * fwd if backward else fwd


def _reads_and_writes(func, args, kwargs, out):
    """(tensors read, tensors written) by one op, by its schema's alias annotations."""
    schema = func._schema
    name = _name(func)
    overwrite = name in _OVERWRITE or schema.overload_name.startswith("out")
    reads, writes = [], []
    bound = list(args) + [kwargs.get(a.name) for a in schema.arguments[len(args):]]
    for arg, value in zip(schema.arguments, bound):
        tensors = [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
        mutated = arg.alias_info is not None and arg.alias_info.is_write
        if mutated:
            writes += tensors
            if not (overwrite and (arg.name in ("self", "out") or arg.kwarg_only)):
                reads += tensors
        else:
            reads += tensors
    outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    written = {(_storage_id(t), _view_key(t)) for t in writes}
    writes += [t for t in outputs if (_storage_id(t), _view_key(t)) not in written]
    return reads, writes


class PhaseTotals:
    def __init__(self):
        self.launches = 0
        self.bytes = 0  # non-GEMM, non-attention
        self.gemm_bytes = 0
        self.attention_bytes = 0
        self.gemm_flops = 0
        self.attention_flops = 0
        self.syncs = 0
        self.launches_by_kind = collections.Counter()
        self.ops = collections.defaultdict(lambda: [0, 0])  # "aten.op" -> [launches, bytes]
        self.regions = collections.defaultdict(lambda: [0, 0])  # region -> [launches, non-GEMM bytes]

    def as_dict(self) -> dict:
        return {
            "launches": self.launches, "bytes": self.bytes, "gemm_flops": self.gemm_flops,
            "attention_flops": self.attention_flops, "gemm_bytes": self.gemm_bytes,
            "attention_bytes": self.attention_bytes, "syncs": self.syncs,
            "launches_by_kind": dict(self.launches_by_kind),
            "ops": {k: {"launches": v[0], "bytes": v[1]} for k, v in sorted(self.ops.items())},
            "regions": {k: {"launches": v[0], "bytes": v[1]} for k, v in sorted(self.regions.items())},
        }


class TrafficCounter(TorchDispatchMode):
    """Dispatch mode that tallies launches, bytes and FLOPs per phase; `phase` says where ops go."""

    def __init__(self):
        super().__init__()
        self.phase = "forward"
        self.totals = {p: PhaseTotals() for p in PHASES}
        self._active: list[str] = []  # regions running now (forward, recompute)
        self._node_region: dict = {}  # autograd node -> region that created it (backward)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.record(func, args, kwargs, out)
        return out

    def record(self, func, args, kwargs, out) -> None:
        kind = kind_of(func)
        t = self.totals[self.phase]
        if kind in ("view", "alloc"):
            return
        if kind == "sync":
            t.syncs += 1
            return
        reads, writes = _reads_and_writes(func, args, kwargs, out)
        nbytes = tensor_bytes(reads) + tensor_bytes(writes)
        t.launches += 1
        t.launches_by_kind[kind] += 1
        op = f"{func.namespace}.{_name(func)}"
        t.ops[op][0] += 1
        if kind == "gemm":
            t.gemm_flops += _gemm_flops(_name(func), args, out)
            t.gemm_bytes += nbytes
        elif kind == "attention":
            t.attention_flops += _attention_flops(func, args)
            t.attention_bytes += nbytes
        else:
            t.bytes += nbytes
            t.ops[op][1] += nbytes
        region = self._active[-1] if self._active else None
        if region is None and self.phase == "backward":
            node = torch._C._current_autograd_node()
            region = self._node_region.get(node) if node is not None else None
        if region is not None:
            t.regions[region][0] += 1
            t.regions[region][1] += nbytes if kind == "other" else 0

    @contextlib.contextmanager
    def in_phase(self, phase: str):
        old, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = old

    def recompute_marker(self, fn):
        """Wrap a checkpointed function: when it runs during "backward", its ops count as "recompute".

        With non-reentrant checkpointing the recompute stops early, by an exception, once the last
        tensor the backward needs is rebuilt; the phase is restored either way.
        """

        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            if self.phase != "backward":
                return fn(*args, **kwargs)
            with self.in_phase("recompute"):
                return fn(*args, **kwargs)

        return wrapped

    def region_marker(self, name: str, fn):
        """Wrap `fn` so that its ops, and in the backward those of the autograd nodes it made, count under `name`."""

        def tensors(tree):
            return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]

        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            before = {t.grad_fn for t in tensors((args, kwargs)) if t.grad_fn is not None}
            self._active.append(name)
            try:
                out = fn(*args, **kwargs)
            finally:
                self._active.pop()
            stack = [t.grad_fn for t in tensors(out) if t.grad_fn is not None]
            while stack:
                node = stack.pop()
                if node in before or node in self._node_region or type(node).__name__ == "AccumulateGrad":
                    continue
                self._node_region[node] = name
                stack += [n for n, _ in node.next_functions if n is not None]
            return out

        return wrapped

    def report(self) -> dict:
        phases = {p: self.totals[p].as_dict() for p in PHASES}
        total = {key: sum(phases[p][key] for p in PHASES)
                 for key in ("launches", "bytes", "gemm_flops", "attention_flops", "gemm_bytes", "attention_bytes",
                             "syncs")}
        ops = collections.defaultdict(lambda: {"launches": 0, "bytes": 0})
        for p in PHASES:
            for name, v in phases[p]["ops"].items():
                ops[name]["launches"] += v["launches"]
                ops[name]["bytes"] += v["bytes"]
        total["ops"] = dict(sorted(ops.items(), key=lambda kv: -kv[1]["bytes"]))
        regions = collections.defaultdict(lambda: {"launches": 0, "bytes": 0})
        for p in PHASES:
            for name, v in phases[p]["regions"].items():
                regions[name]["launches"] += v["launches"]
                regions[name]["bytes"] += v["bytes"]
        total["regions"] = dict(regions)
        return {**phases, "total": total}


def top_ops(report: dict, n: int = 10) -> list[tuple[str, int, int]]:
    """(op, launches, bytes) of the n non-GEMM, non-attention ops with the most bytes over all phases."""
    rows = [(name, v["launches"], v["bytes"]) for name, v in report["total"]["ops"].items() if v["bytes"]]
    return sorted(rows, key=lambda r: -r[2])[:n]
