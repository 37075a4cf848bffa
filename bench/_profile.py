"""Where a profiled training step spends its time: the costliest kernels, the device's idle gaps
between them, and the attention implementation that actually ran.

`profile_steps(train, skip, active, device)` runs `train(after_step)`, a training loop that calls
`after_step()` once per finished step; the profiler records steps skip+1 .. skip+active.

Rules of the summary:
- On CUDA a "kernel" is a profiler event on the device (kernels, copies, memsets). Each row of
  `top_kernels` is one kernel name: its device time per step, launches per step and share of the
  step's wall time.
- The window is from the first device event to the last one of the recorded steps. `device_busy_ms`
  is the union of the device events' intervals in it; `host_idle_ms` the rest: time the device waited
  for the host (launch overheads, syncs, Python), per step.
- `attention` lists the attention ops seen on the host side (SDPA's cuDNN / flash / efficient / math
  backends, or i2v's own `i2v::` attention op), so the backend a variant ran is read, not assumed.
- Without CUDA (the smoke run) the host's aten ops stand in for kernels; their times nest, so the
  shares and idle time only show that the code runs, not how fast anything is.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, schedule

ATTENTION_OPS = {
    "aten::_scaled_dot_product_cudnn_attention": "sdpa-cudnn",
    "aten::_scaled_dot_product_flash_attention": "sdpa-flash",
    "aten::_scaled_dot_product_efficient_attention": "sdpa-efficient",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "sdpa-cpu-flash",
    "aten::_scaled_dot_product_attention_math": "sdpa-math",
}


def attention_impl(name: str) -> str | None:
    """The attention implementation a host-side op name stands for, or None."""
    if name in ATTENTION_OPS:
        return ATTENTION_OPS[name]
    if name.startswith("i2v::") and "attention" in name:
        return "i2v-triton"
    return None


def _union_ns(intervals: list[tuple[int, int]]) -> int:
    busy, end = 0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    return busy


def summarize(events, active: int, cuda: bool, top: int = 15) -> dict:
    """The summary above from kineto events of `active` recorded steps."""
    device_type = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    kernels, attention = [], set()
    for e in events:
        name = e.name()
        impl = attention_impl(name)
        if impl and e.device_type() == torch.autograd.DeviceType.CPU:
            attention.add(impl)
        if e.device_type() != device_type or e.duration_ns() <= 0:
            continue
        if not cuda and (not name.startswith("aten::") or name.startswith("ProfilerStep")):
            continue
        kernels.append((name, e.start_ns(), e.start_ns() + e.duration_ns()))
    if not kernels:
        return {"top_kernels": [], "attention": sorted(attention), "kernels_per_step": 0,
                "step_window_ms": None, "device_busy_ms": None, "host_idle_ms": None, "host_idle_fraction": None}
    window = max(e for _, _, e in kernels) - min(s for _, s, _ in kernels)
    busy = _union_ns([(s, e) for _, s, e in kernels])
    by_name: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name, s, e in kernels:
        by_name[name][0] += e - s
        by_name[name][1] += 1
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    per_step_ms = lambda ns: ns / active / 1e6  # noqa: E731
    return {
        "top_kernels": [{"name": name, "ms_per_step": per_step_ms(ns), "calls_per_step": calls / active,
                         "share_of_step": ns / window} for name, (ns, calls) in rows],
        "attention": sorted(attention),
        "kernels_per_step": len(kernels) / active,
        "step_window_ms": per_step_ms(window),
        "device_busy_ms": per_step_ms(busy),
        "host_idle_ms": per_step_ms(window - busy),
        "host_idle_fraction": (window - busy) / window,
    }


def profile_steps(train, skip: int, active: int, device: torch.device) -> dict:
    """Run `train(after_step)` under the profiler, recording `active` steps after `skip` (see above)."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    found: dict = {}

    def ready(prof) -> None:
        found.update(summarize(prof.profiler.kineto_results.events(), active, cuda))

    # `skip` steps pass before the profiler warms up on one more and then records `active`.
    wait = max(skip - 1, 0)
    steps = 0
    with profile(activities=activities, schedule=schedule(wait=wait, warmup=1, active=active, repeat=1),
                 on_trace_ready=ready) as prof:
        def after_step() -> None:
            nonlocal steps
            steps += 1
            prof.step()

        train(after_step)
    if steps < wait + 1 + active:
        raise RuntimeError(f"the loop ran {steps} steps, fewer than the {wait + 1 + active} the profile needs")
    return found


def print_table(label: str, summary: dict) -> None:
    idle = summary["host_idle_ms"]
    head = f"{label}: attention {', '.join(summary['attention']) or 'none seen'}"
    if idle is not None:
        head += (f" | {summary['kernels_per_step']:.0f} kernels/step, device busy {summary['device_busy_ms']:.1f} ms, "
                 f"host idle {idle:.1f} ms ({summary['host_idle_fraction']:.1%}) per step")
    print(head)
    for row in summary["top_kernels"]:
        print(f"  {row['share_of_step']:6.1%} {row['ms_per_step']:9.2f} ms {row['calls_per_step']:6.1f}x  {row['name'][:90]}")
