"""Plan a run before launching it: parameters, memory per rank, FLOPs, step time, fits or not.

    python launcher/plan.py --config configs/cogvideox-5b-i2v.yaml --gpus 8 --gpu-mem-gb 80 [key=value ...]

Reads only the architecture (model.arch, model.arch_file or model.pretrained's config.json), never
weights or data, and needs no GPU. Overrides are the training config's: deepspeed.zero_stage=3 ...
"""

from i2v.core.cli import run
from i2v.config import parse_args
from i2v.core.errors import ConfigError


def _flags(parser):
    parser.add_argument("--gpus", type=int, default=1, help="accelerators in the run (the world size)")
    parser.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory of one accelerator in GiB")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation the step time assumes")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak TFLOP/s of one accelerator (default: train.peak_tflops, else 989, H100/H200 SXM bf16)")


def main():
    cfg, args = parse_args(description=__doc__, extra=_flags)
    for flag, value, ok in (("--gpus", args.gpus, args.gpus >= 1), ("--gpu-mem-gb", args.gpu_mem_gb, args.gpu_mem_gb > 0),
                            ("--mfu", args.mfu, 0 < args.mfu <= 1),
                            ("--peak-tflops", args.peak_tflops, args.peak_tflops is None or args.peak_tflops > 0)):
        if not ok:
            raise ConfigError(f"{flag}: {value} is out of range")

    from i2v.plan.planner import make_plan, render

    plan = make_plan(cfg, args.gpus, args.gpu_mem_gb, mfu=args.mfu, peak_tflops=args.peak_tflops)
    print(render(cfg, plan), flush=True)


if __name__ == "__main__":
    run(main)
