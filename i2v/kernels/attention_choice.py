"""`kernels.attention: auto` on CUDA: time every attention implementation at the run's shape, keep the fastest.

Candidates, in the order that breaks a tie:

    triton          our flash kernel (`i2v.kernels.attention.flash_attention`)
    sdpa-cudnn      torch SDPA restricted to SDPBackend.CUDNN_ATTENTION
    sdpa-flash      torch SDPA restricted to SDPBackend.FLASH_ATTENTION
    sdpa-efficient  torch SDPA restricted to SDPBackend.EFFICIENT_ATTENTION

`measure_attention` times forward + backward of each on [B, S, H, D] storage viewed as [B, H, S, D]
(what the processors pass), after one warm-up call each (which compiles, autotunes or picks
algorithms), with CUDA events; a candidate that raises for this shape or dtype is left out and the
reason recorded. `choose_attention` picks the fastest; `choose_cached` keeps the times and the
choice in a JSON file keyed by the device, the shape, the dtype and the library versions, so a
resumed run does not measure again.
"""

from __future__ import annotations

import json
import math
import statistics

import torch

from i2v.core.fsutil import write_json_atomic

CANDIDATES = ("triton", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient")
_SDPA = {"sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION"}


def sdpa_backend(name: str):
    """The torch.nn.attention.SDPBackend of an "sdpa-*" candidate."""
    from torch.nn.attention import SDPBackend

    if name not in _SDPA:
        raise ValueError(f"not an SDPA candidate: {name!r} (one of {', '.join(_SDPA)})")
    return getattr(SDPBackend, _SDPA[name])


def _sdpa_call(backend):
    from torch.nn.attention import sdpa_kernel

    def call(q, k, v):
        # The backward runs the kernel the forward dispatched to, so only the forward needs the restriction.
        with sdpa_kernel([backend]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return call


def _triton_call(q, k, v):
    from i2v.kernels.attention import flash_attention

    return flash_attention(q, k, v, backend="triton")


def _median_ms(step, device, repeats: int | None, budget_s: float) -> float:
    step()  # warm-up: compilation, autotuning, cuDNN plans
    torch.cuda.synchronize(device)
    if repeats is None:  # as many as fit the budget, from one timed call
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize(device)
        repeats = max(1, min(10, int(budget_s * 1e3 / max(start.elapsed_time(end), 1e-3))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(start.elapsed_time(end) for start, end in events)


def measure_attention(shape, dtype, device, repeats: int | None = None, budget_s: float = 0.06,
                      skipped: dict | None = None) -> dict[str, float]:
    """Milliseconds of one forward + backward per candidate at `shape` = (B, H, S, D) on a CUDA `device`.

    `repeats` timed calls per candidate (median); None: as many as fit `budget_s` (at most 10), so
    the four take a few hundred milliseconds after their warm-ups (the Triton warm-up autotunes at
    a new shape, which the training run would do on its first step anyway). Candidates that raise
    are missing from the result; `skipped`, if given, receives {name: reason} for them."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"measure_attention needs a CUDA device, got {device}")
    skipped = {} if skipped is None else skipped
    with torch.cuda.device(device):
        times = _time_candidates(shape, dtype, device, repeats, budget_s, skipped)
    torch.cuda.empty_cache()  # the inputs and gradients are gone with _time_candidates
    return times


def _time_candidates(shape, dtype, device, repeats, budget_s, skipped) -> dict[str, float]:
    b, h, s, d = shape
    calls = {"triton": _triton_call}
    calls.update({name: _sdpa_call(sdpa_backend(name)) for name in _SDPA})
    gen = torch.Generator(device=device).manual_seed(0)
    leaves = [torch.randn(b, s, h, d, device=device, dtype=dtype, generator=gen).requires_grad_() for _ in range(3)]
    q, k, v = (t.transpose(1, 2) for t in leaves)  # [B, S, H, D] storage, [B, H, S, D] view
    grad_out = torch.randn(b, h, s, d, device=device, dtype=dtype, generator=gen)
    times = {}
    for name in CANDIDATES:
        def step(call=calls[name]):
            out = call(q, k, v)
            torch.autograd.grad(out, leaves, grad_out)  # no .grad accumulation between calls
        try:
            times[name] = _median_ms(step, device, repeats, budget_s)
        except Exception as e:  # noqa: BLE001 - an unsupported shape, dtype or GPU: recorded, not fatal
            text = str(e).strip()
            skipped[name] = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
            torch.cuda.synchronize(device)
    return times


def choose_attention(times: dict[str, float]) -> str:
    """The fastest candidate of `times` (ms); equal times go to the earlier one in `CANDIDATES`."""
    unknown = set(times) - set(CANDIDATES)
    if unknown:
        raise ValueError(f"unknown attention candidates {sorted(unknown)}; known: {', '.join(CANDIDATES)}")
    valid = {n: t for n, t in times.items() if isinstance(t, (int, float)) and math.isfinite(t) and t > 0}
    if not valid:
        raise ValueError(f"no attention candidate has a usable time: {times}")
    return min(valid, key=lambda n: (valid[n], CANDIDATES.index(n)))


def cache_key(shape, dtype, device) -> dict:
    """What a stored choice depends on: the GPU, the shape and dtype, and torch, cuDNN and triton versions."""
    device = torch.device(device)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "shape": [int(x) for x in shape],
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": triton_version,
    }


def choose_cached(cache_path, key: dict, measure) -> tuple[str, dict[str, float], bool]:
    """(choice, times, cached): the stored choice if `cache_path` holds times for `key`, else `measure()`
    (a callable returning times in ms) chosen from and written to `cache_path` atomically. A file
    that cannot be read, is not our JSON, or was measured for another key is measured again."""
    key = json.loads(json.dumps(key))  # as it reads back (tuples become lists)
    try:
        with open(cache_path) as f:
            stored = json.load(f)
        if isinstance(stored, dict) and stored.get("key") == key:
            times = {str(n): float(t) for n, t in stored["times_ms"].items()}
            return choose_attention(times), times, True
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass
    times = measure()
    choice = choose_attention(times)
    write_json_atomic(cache_path, {"key": key, "times_ms": times, "choice": choice})
    return choice, times, False
