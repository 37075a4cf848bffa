"""Benchmark: our fused Triton flash attention against torch SDPA's flash, cuDNN and efficient kernels.

GPU (the target):   python bench/attention.py
    B=1, S=17,776 (226 text + 13x30x45 video tokens, CogVideoX at 49 frames, 480x720), bf16,
    shapes 5b (H=48, D=64), 2b (H=30, D=64) and d128 (H=24, D=128, the 5B width with 128-wide heads).
    Each SDPA contender is forced with torch.nn.attention.sdpa_kernel; times are medians of
    triton.testing.do_bench on fresh random inputs. FLOPs: 4*B*H*S^2*D forward, 2.5x that
    backward (bwd time = fwd+bwd time - fwd time). Before timing, ours and SDPA flash are
    checked at full length on 2 heads against an fp32 reference (O, dQ, dK, dV); the run exits
    1 if ours is worse than 2x SDPA flash's error + 1e-5 on any of them.
    Writes bench/results/attention-<gpu>.json (e.g. attention-nvidia-h200.json).

CPU (no CUDA): a smoke run of the same code path at tiny shapes, fp32, timed with
    time.perf_counter under the Triton interpreter; writes bench/results/attention-cpu-smoke.json
    with "mode": "cpu-smoke". Its times say nothing about GPU speed.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import sys
import time

import torch

from _kernels import CUDA, git_commit, load_kernel, write_result  # noqa: E402  (sets TRITON_INTERPRET without CUDA)

import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

attn = load_kernel("attention")

SEQ = 17_776
GPU_SHAPES = {"5b": (1, 48, SEQ, 64), "2b": (1, 30, SEQ, 64), "d128": (1, 24, SEQ, 128)}
SMOKE_SHAPES = {"5b": (1, 2, 130, 64), "2b": (1, 1, 77, 64), "d128": (1, 1, 77, 128)}
SDPA_CONTENDERS = {
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def _contender(name):
    """(q, k, v) -> O for one contender, with its backend forced."""
    if name == "ours":
        return lambda q, k, v: attn.flash_attention(q, k, v, backend="triton")
    backend = SDPA_CONTENDERS[name]

    def run(q, k, v):
        with sdpa_kernel([backend]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    return run


def _inputs(shape, dtype, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v, do = (torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(4))
    return [t.requires_grad_() for t in (q, k, v)], do


def _median_ms(fn, smoke):
    if not smoke:
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    fn()  # warm-up: first call compiles (or traces) the kernels
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _time_contender(name, shape, dtype, device, seed, smoke):
    fn = _contender(name)
    (q, k, v), do = _inputs(shape, dtype, device, seed)

    def fwd():
        with torch.no_grad():
            fn(q, k, v)

    def fwd_bwd():
        torch.autograd.grad(fn(q, k, v), (q, k, v), do)

    fwd_bwd()  # autotunes ours (and raises for an SDPA backend this GPU lacks) outside the timing
    if CUDA:
        torch.cuda.synchronize()
    fwd_ms = _median_ms(fwd, smoke)
    fwd_bwd_ms = _median_ms(fwd_bwd, smoke)
    b, h, s, d = shape
    flops = 4 * b * h * s * s * d
    bwd_ms = fwd_bwd_ms - fwd_ms
    return {
        "fwd_ms": fwd_ms,
        "fwd_bwd_ms": fwd_bwd_ms,
        "bwd_ms": bwd_ms,
        "fwd_tflops": flops / fwd_ms / 1e9,
        "bwd_tflops": 2.5 * flops / bwd_ms / 1e9 if bwd_ms > 0 else None,
        "fwd_bwd_tflops": 3.5 * flops / fwd_bwd_ms / 1e9,
    }


def _errors(fn, q, k, v, do, ref):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    o = fn(*leaves)
    grads = torch.autograd.grad(o, leaves, do)
    return {n: (x.float() - r).abs().max().item() for n, x, r in zip(("O", "dQ", "dK", "dV"), (o, *grads), ref)}


def check_correctness(shape, dtype, device, heads=2, seed=1234):
    """Ours and SDPA flash (SDPA default on CPU) vs an fp32 reference on `heads` heads at full length."""
    b, _, s, d = shape
    (q, k, v), do = _inputs((b, heads, s, d), dtype, device, seed)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference must be real fp32
    try:
        leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
        o = attn.attention_ref(*leaves)
        ref = [o.detach(), *torch.autograd.grad(o, leaves, do.float())]
        del o, leaves
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    baseline = "sdpa_flash" if CUDA else "sdpa_default"
    base_fn = _contender("sdpa_flash") if CUDA else torch.nn.functional.scaled_dot_product_attention
    ours = _errors(_contender("ours"), q, k, v, do, ref)
    base = _errors(base_fn, q, k, v, do, ref)
    ok = all(ours[n] <= 2 * base[n] + 1e-5 for n in ours)
    return {"shape": [b, heads, s, d], "dtype": str(dtype), "reference": "fp32",
            "max_abs_err": {"ours": ours, baseline: base}, "ok": ok}


def _device_name():
    return torch.cuda.get_device_name() if CUDA else platform.processor() or "cpu"


def _best_configs():
    out = {}
    for name in ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"):
        best = getattr(getattr(attn, name), "best_config", None)
        out[name] = str(best) if best is not None else None
    return out


def _commit_string():
    head, dirty = git_commit("i2v/kernels/attention.py", "bench/attention.py")
    return f"{head}{'-dirty' if dirty else ''}" if head else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(GPU_SHAPES), default=list(GPU_SHAPES),
                        help="which shapes to time (default: all)")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="output JSON path")
    args = parser.parse_args(argv)

    smoke = not CUDA
    device = torch.device("cuda" if CUDA else "cpu")
    dtype = torch.bfloat16 if CUDA else torch.float32
    shapes = SMOKE_SHAPES if smoke else GPU_SHAPES
    contenders = ["ours", *SDPA_CONTENDERS]
    gpu = _device_name()
    print(f"attention bench on {gpu} ({'cpu-smoke' if smoke else 'gpu'}), {dtype}, torch {torch.__version__}, "
          f"triton {triton.__version__}")

    correctness = check_correctness(shapes["5b"], dtype, device)
    print(f"correctness at {correctness['shape']}: {json.dumps(correctness['max_abs_err'])} "
          f"-> {'ok' if correctness['ok'] else 'FAILED'}")

    results = {}
    for i, name in enumerate(args.shapes):
        shape = shapes[name]
        b, h, s, d = shape
        entry = {"B": b, "H": h, "S": s, "D": d, "fwd_flops": 4 * b * h * s * s * d, "backends": {}}
        for j, contender in enumerate(contenders):
            try:
                timing = _time_contender(contender, shape, dtype, device, seed=100 * i + j, smoke=smoke)
            except RuntimeError as exc:  # an SDPA backend that this GPU / build / dtype cannot run
                timing = {"error": str(exc).splitlines()[0][:300]}
            entry["backends"][contender] = timing
            if contender == "ours" and "error" not in timing:
                entry["autotune"] = _best_configs()  # the configs this shape's last calls used
            if "error" in timing:
                print(f"  {name:5s} {contender:15s} unavailable: {timing['error']}")
            else:
                print(f"  {name:5s} {contender:15s} fwd {timing['fwd_ms']:9.3f} ms ({timing['fwd_tflops']:6.1f} TFLOP/s)"
                      f"  fwd+bwd {timing['fwd_bwd_ms']:9.3f} ms"
                      f"  bwd {timing['bwd_tflops'] or float('nan'):6.1f} TFLOP/s")
            if CUDA:
                torch.cuda.empty_cache()
        results[name] = entry

    summary = {}
    if "5b" in results:
        ours = results["5b"]["backends"]["ours"]
        sdpa = [r["fwd_bwd_ms"] for c, r in results["5b"]["backends"].items() if c != "ours" and "error" not in r]
        summary = {
            "fwd_tflops_5b": ours.get("fwd_tflops"),
            "bwd_tflops_5b": ours.get("bwd_tflops"),
            "fwd_bwd_speedup_vs_best_sdpa_5b": (min(sdpa) / ours["fwd_bwd_ms"]) if sdpa and "fwd_bwd_ms" in ours
            else None,
        }

    record = {
        "gpu": gpu,
        "mode": "cpu-smoke" if smoke else "gpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": _commit_string(),
        "dtype": str(dtype),
        "layout": "[B, H, S, D] contiguous",
        "timer": "time.perf_counter median of 3" if smoke else "triton.testing.do_bench median",
        **summary,
        "correctness": correctness,
        "shapes": results,
    }
    write_result("attention", gpu, smoke, record, args.out)
    if summary.get("fwd_bwd_speedup_vs_best_sdpa_5b") is not None:
        print(f"5b: fwd {summary['fwd_tflops_5b']:.1f} TFLOP/s, bwd {summary['bwd_tflops_5b']:.1f} TFLOP/s, "
              f"fwd+bwd speedup vs best SDPA {summary['fwd_bwd_speedup_vs_best_sdpa_5b']:.2f}x")
    return 0 if correctness["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
