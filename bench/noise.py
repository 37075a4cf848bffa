"""Benchmark: the fused noise-injection kernel against the stock PyTorch chain, torch.compile of
that chain, and a device-to-device copy of the bytes the operation cannot avoid moving.

GPU (the target):   python bench/noise.py            (options: --dtype bf16|fp16|fp32, --no-compile)
    Shapes: CogVideoX latents of a 49-frame 480x720 clip, x0 [B, 13, 16, 60, 90] with image
    latents [B, 1, 16, 60, 90], B=1 and B=64, bf16. Contenders, each the median of
    triton.testing.do_bench:
      eager    what a stock trainer writes: randn_like, add_noise, zero pad, two cats, velocity,
               all in x0's dtype (sqrt(alpha_bar) given, so the schedule gather is not counted)
      compile  torch.compile of that same function (its randn is fused Philox too)
      ours     inject_noise(backend="triton")
      copy     dst.copy_(src) moving the minimal bytes: read x0 and the image latents, write
               model_input and target (a copy of half that many bytes reads and writes them)
    Derived: speedup_vs_eager_b1, speedup_vs_compile_b1 (time ratios), fraction_of_copy_bw_b64
    (copy time / our time: 1.0 means the kernel moves its bytes as fast as a plain copy).
    Also a block-size sweep of ours at B=64 and the pixel condition noise, [8, 3, 480, 720] fp32,
    against its eager and compiled forms. Before timing, ours is checked against the reference on
    its own noise, and its noise's mean and std are checked; the run exits 1 on a failure.
    Writes bench/results/noise-<gpu>.json (e.g. noise-nvidia-h200.json).

CPU (no CUDA): a smoke run of the same code at tiny shapes, timed with time.perf_counter, the
    kernels under the Triton interpreter; writes bench/results/noise-cpu-smoke.json with
    "mode": "cpu-smoke". Its times say nothing about GPU speed: the interpreter is orders of
    magnitude slower than eager torch there, as expected.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import platform
import statistics
import sys
import time

import torch

from _kernels import CUDA, git_commit, load_kernel, write_result  # noqa: E402  (sets TRITON_INTERPRET without CUDA)

import triton  # noqa: E402
import triton.testing  # noqa: E402

noise = load_kernel("noise")

GPU_SHAPES = {"b1": (1, 13, 16, 60, 90), "b64": (64, 13, 16, 60, 90)}
SMOKE_SHAPES = {"b1": (1, 3, 4, 6, 10), "b64": (8, 2, 4, 4, 6)}  # "b64" stands for the big batch
GPU_FRAMES = (8, 3, 480, 720)  # K noisy draws of one 480x720 first frame
SMOKE_FRAMES = (2, 3, 16, 24)
GPU_BLOCKS = (256, 512, 1024, 2048, 4096)
SMOKE_BLOCKS = (64, 128)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SEED, OFFSET = 1234, 5


def stock_chain(x0, image_latents, sqrt_a, sqrt_1ma):
    """Noise injection as stock CogVideoX I2V fine-tuning scripts write it, in x0's dtype."""
    noise_ = torch.randn_like(x0)
    a = sqrt_a.to(x0.dtype).view(-1, 1, 1, 1, 1)
    s = sqrt_1ma.to(x0.dtype).view(-1, 1, 1, 1, 1)
    noisy = a * x0 + s * noise_
    padding = image_latents.new_zeros(x0.shape[0], x0.shape[1] - 1, *x0.shape[2:])
    image = torch.cat([image_latents, padding], dim=1)
    model_input = torch.cat([noisy, image], dim=2)
    target = a * noise_ - s * x0
    return model_input, target


def stock_condition(frames, sigma):
    return frames + sigma.view(-1, *([1] * (frames.dim() - 1))) * torch.randn_like(frames)


def _inputs(shape, dtype, device, seed=0):
    b, f, c, h, w = shape
    g = torch.Generator(device=device).manual_seed(seed)
    x0 = torch.randn(shape, generator=g, device=device).to(dtype)
    img = torch.randn((b, 1, c, h, w), generator=g, device=device).to(dtype)
    sqrt_a = torch.rand(b, generator=g, device=device)
    return x0, img, sqrt_a, (1 - sqrt_a**2).sqrt()


def _median_ms(fn, smoke):
    if not smoke:
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    fn()  # warm-up (interpreter tracing, compile)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _copy_fn(nbytes, device):
    """A copy whose read + write traffic is `nbytes`."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def time_injection(shape, dtype, device, smoke, use_compile):
    x0, img, sqrt_a, sqrt_1ma = _inputs(shape, dtype, device)
    model_input, target = noise.inject_noise(x0, img, sqrt_a, sqrt_1ma, SEED, OFFSET, backend="triton")
    nbytes = sum(t.numel() * t.element_size() for t in (x0, img, model_input, target))
    fns = {"eager": lambda: stock_chain(x0, img, sqrt_a, sqrt_1ma)}
    if use_compile:
        compiled = torch.compile(stock_chain, dynamic=False)
        fns["compile"] = lambda: compiled(x0, img, sqrt_a, sqrt_1ma)
    fns["ours"] = lambda: noise.inject_noise(x0, img, sqrt_a, sqrt_1ma, SEED, OFFSET, backend="triton")
    fns["copy"] = _copy_fn(nbytes, device)
    ms = {name: _median_ms(fn, smoke) for name, fn in fns.items()}
    return {
        "shape": list(shape),
        "dtype": str(dtype),
        "min_bytes": nbytes,
        "ms": ms,
        "gbps_at_min_bytes": {name: nbytes / (t * 1e-3) / 1e9 for name, t in ms.items()},
    }


def time_blocks(shape, dtype, device, smoke, blocks):
    x0, img, sqrt_a, sqrt_1ma = _inputs(shape, dtype, device)
    n = math.prod(shape[2:])
    out = {}
    for block in blocks:
        out[str(block)] = _median_ms(
            lambda: noise._launch_inject(x0, img, sqrt_a, sqrt_1ma, SEED, OFFSET, "v", False, block=block), smoke
        )
    return {"shape": list(shape), "default_block": noise._block_for(n), "ms": out}


def time_condition(shape, device, smoke, use_compile):
    frames = torch.rand(shape, device=device) * 2 - 1
    sigma = torch.full((shape[0],), 0.05, device=device)
    nbytes = 2 * frames.numel() * frames.element_size()
    fns = {"eager": lambda: stock_condition(frames, sigma)}
    if use_compile:
        compiled = torch.compile(stock_condition, dynamic=False)
        fns["compile"] = lambda: compiled(frames, sigma)
    fns["ours"] = lambda: noise.condition_noise(frames, sigma, SEED, OFFSET, backend="triton")
    fns["copy"] = _copy_fn(nbytes, device)
    ms = {name: _median_ms(fn, smoke) for name, fn in fns.items()}
    return {"shape": list(shape), "dtype": "torch.float32", "min_bytes": nbytes, "ms": ms}


def check_correctness(shape, dtype, device):
    """Ours against the reference on its own noise: fp32 closely, `dtype` within the stock chain's error."""
    x0, img, sqrt_a, sqrt_1ma = _inputs(shape, torch.float32, device, seed=1)
    inp32, tgt32, eps32 = noise.inject_noise(
        x0, img, sqrt_a, sqrt_1ma, SEED, OFFSET, backend="triton", return_noise=True
    )
    ref_inp, ref_tgt = noise.inject_noise_ref(x0, img, sqrt_a, sqrt_1ma, eps32)
    err32 = max((inp32 - ref_inp).abs().max().item(), (tgt32 - ref_tgt).abs().max().item())

    xl, il = x0.to(dtype), img.to(dtype)
    inp, tgt, eps = noise.inject_noise(xl, il, sqrt_a, sqrt_1ma, SEED, OFFSET, backend="triton", return_noise=True)
    exact_inp, exact_tgt = noise.inject_noise_ref(xl.float(), il.float(), sqrt_a, sqrt_1ma, eps32)
    a, s = sqrt_a.to(dtype).view(-1, 1, 1, 1, 1), sqrt_1ma.to(dtype).view(-1, 1, 1, 1, 1)
    stock_xt, stock_tgt = a * xl + s * eps32.to(dtype), a * eps32.to(dtype) - s * xl
    c = shape[2]
    err = max(
        (inp[:, :, :c].float() - exact_inp[:, :, :c]).abs().max().item(), (tgt.float() - exact_tgt).abs().max().item()
    )
    err_stock = max(
        (stock_xt.float() - exact_inp[:, :, :c]).abs().max().item(), (stock_tgt.float() - exact_tgt).abs().max().item()
    )
    image_exact = bool(torch.equal(inp[:, :1, c:], il)) and not inp[:, 1:, c:].any().item()
    same_stream = bool(torch.equal(eps, eps32.to(dtype)))

    z = eps32.double()
    n = z.numel()
    mean, std = z.mean().item(), z.std().item()
    checks = {
        "fp32_within_1e-5": err32 <= 1e-5,
        "lowp_within_2x_stock": err <= 2 * err_stock + 1e-6,
        "image_half_exact": image_exact,
        "stream_independent_of_dtype": same_stream,
        "noise_mean": abs(mean) < 5 / math.sqrt(n),
        "noise_std": abs(std - 1) < 5 / math.sqrt(2 * n),
    }
    return {
        "shape": list(shape),
        "dtype": str(dtype),
        "max_abs_err_fp32": err32,
        "max_abs_err_lowp": err,
        "max_abs_err_stock_lowp": err_stock,
        "noise_mean": mean,
        "noise_std": std,
        "noise_values": n,
        "checks": checks,
        "ok": all(checks.values()),
    }


def _device_name():
    return torch.cuda.get_device_name() if CUDA else platform.processor() or "cpu"


def _print_table(title, rec):
    print(f"\n{title}: shape {rec['shape']} {rec['dtype']}, {rec['min_bytes'] / 1e6:.1f} MB minimal traffic")
    eager = rec["ms"]["eager"]
    for name, t in rec["ms"].items():
        gbps = rec["min_bytes"] / (t * 1e-3) / 1e9
        print(f"  {name:8s} {t:10.4g} ms  {gbps:9.4g} GB/s at minimal bytes  {eager / t:8.3g}x eager")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender")
    parser.add_argument("--out", type=pathlib.Path, help="result file (default: bench/results/noise-<gpu>.json)")
    args = parser.parse_args(argv)

    if CUDA and os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("TRITON_INTERPRET=1 is set on a CUDA machine: unset it to time the compiled kernel")
    smoke = not CUDA
    device = "cuda" if CUDA else "cpu"
    dtype = DTYPES[args.dtype]
    shapes = SMOKE_SHAPES if smoke else GPU_SHAPES
    use_compile = not args.no_compile
    gpu = "cpu" if smoke else _device_name()
    commit, dirty = git_commit("i2v/kernels/noise.py", "bench/noise.py")
    commit = commit or "unknown"
    record = {
        "gpu": gpu,
        "mode": "cpu-smoke" if smoke else "gpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": commit,
        "dirty": dirty,
        "dtype": str(dtype),
        "timer": "time.perf_counter median of 3" if smoke else "triton.testing.do_bench median",
    }
    if smoke:
        record["note"] = (
            "Triton interpreter on CPU at tiny shapes: checks that the script runs, says nothing about GPU speed"
        )

    check_shape = shapes["b1"]
    correctness = check_correctness(check_shape, dtype, device)
    record["correctness"] = correctness
    print(f"correctness at {check_shape}: fp32 err {correctness['max_abs_err_fp32']:.2e}, "
          f"{args.dtype} err {correctness['max_abs_err_lowp']:.2e} "
          f"(stock {correctness['max_abs_err_stock_lowp']:.2e}), "
          f"noise mean {correctness['noise_mean']:+.4f} std {correctness['noise_std']:.4f}: "
          f"{'ok' if correctness['ok'] else 'FAILED ' + str(correctness['checks'])}")  # fmt: skip

    if correctness["ok"]:
        record["shapes"] = {k: time_injection(shape, dtype, device, smoke, use_compile) for k, shape in shapes.items()}
        b1, b64 = record["shapes"]["b1"]["ms"], record["shapes"]["b64"]["ms"]
        record["speedup_vs_eager_b1"] = b1["eager"] / b1["ours"]
        record["speedup_vs_compile_b1"] = b1["compile"] / b1["ours"] if use_compile else None
        record["fraction_of_copy_bw_b64"] = b64["copy"] / b64["ours"]
        record["fraction_of_copy_bw_b1"] = b1["copy"] / b1["ours"]
        blocks = SMOKE_BLOCKS if smoke else GPU_BLOCKS
        record["block_sweep_b64"] = time_blocks(shapes["b64"], dtype, device, smoke, blocks)
        record["condition"] = time_condition(SMOKE_FRAMES if smoke else GPU_FRAMES, device, smoke, use_compile)

        for key in shapes:
            _print_table(f"inject_noise {key}", record["shapes"][key])
        _print_table("condition_noise", {**record["condition"]})
        sweep = record["block_sweep_b64"]
        print(f"\nblock sweep b64 (default {sweep['default_block']}): "
              + ", ".join(f"{b}: {t:.4g} ms" for b, t in sweep["ms"].items()))  # fmt: skip
        compile_txt = f"{record['speedup_vs_compile_b1']:.3g}x" if use_compile else "skipped"
        print(f"\nspeedup vs eager (b1) {record['speedup_vs_eager_b1']:.3g}x, vs compile (b1) {compile_txt}, "
              f"fraction of copy bandwidth (b64) {record['fraction_of_copy_bw_b64']:.3g}")  # fmt: skip

    write_result("noise", gpu, smoke, record, args.out)
    return 0 if correctness["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
