#!/usr/bin/env bash
# The GPU benchmark suite: about 8 minutes on one H200, writing bench/results/*-nvidia-*.json.
# Measured on an H200 (torch 2.11, triton 3.6): noise 33 s, attention about 200 s the first time (the
# autotune compiles 88 configs; 14 s once TRITON_CACHE_AUTOTUNING has them), train_step 125 s with its
# former two variants (its five are not yet timed on a GPU), SP 5 s.
#
#   noise              bench/noise.py                    fused noise injection vs eager / torch.compile / copy
#   attention          bench/attention.py --shapes 5b    flash attention vs SDPA flash / cuDNN / efficient, S=17,776
#   train_step         bench/train_step.py --shape 5b    the 5B-I2V step (8 of 42 blocks) at 49x480x720: i2v's trainer
#                                                        (checkpointing all / auto; auto with compiled blocks) vs
#                                                        the stock diffusers loop (eager / compiled blocks): MFU,
#                                                        HFU, peak memory, profiler
#                                                        tables, and the planner's estimate against the measured peak
#   sequence_parallel  bench/sequence_parallel.py        SP 1/2/4/8 from the architecture; SP 1 vs 2 measured
#   train_step_fp8     bench/train_step.py --shape 5b --variants i2v-compile,i2v-fp8-rowwise,i2v-fp8-tensorwise
#                                                        model.fp8.compute against the same compiled bf16 step
#                                                        (goal 1.2x), into train_step-5b-fp8-<gpu>.json; only where
#                                                        torchao imports (device-wheels.sh --with-fp8)
#
# The GPU machine has Python 3.12, torch 2.11, triton 3.6 and lacks deepspeed, diffusers, webdataset
# and peft. Fetch their wheels on a machine with network access, from the project root:
#     ../shared/tools/device-wheels.sh
# then carry .whl/ to the GPU machine and, from the project root there, run:
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$PWD/.site" .whl/*.whl \
#       && ln -sfn ../data_prep i2v/data_prep && export PYTHONPATH="$PWD/.site:$PWD" || exit;
#     bash bench/gpu.sh
# (`pip install -e .` fails there: setuptools' develop shim re-runs pip with build isolation, which
# needs the network. The link puts data_prep/ where setup.py installs it, as i2v.data_prep.)
#
# bash bench/gpu.sh --cpu-smoke runs the same suite on the CPU at tiny shapes (kernels under the
# Triton interpreter), writing *-cpu-smoke.json: it shows the scripts work, not how fast anything is.
# LAYERS=K changes the 5B blocks timed (42 is the whole model; its states need about 100 GiB on one GPU).
# Each benchmark has a time limit; a failing one is reported and the others still run; the exit
# code is the number of failures.
set -uo pipefail
cd "$(dirname "$0")/.."

smoke=0 scale=1
[ "${1:-}" = "--cpu-smoke" ] && smoke=1 scale=5  # the Triton interpreter and a CPU take longer
PY=${PYTHON:-python3}
if [ $smoke = 1 ] && [ -x .venv/bin/python ]; then
    PY=${PYTHON:-.venv/bin/python}
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}  # DeepSpeed's CPU ops
fi
export PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
LAYERS=${LAYERS:-8}

has_cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))") || exit 1
if [ $smoke = 0 ] && [ "$has_cuda" = 0 ]; then
    echo "error: no CUDA device here; bash bench/gpu.sh --cpu-smoke runs the CPU smoke version" >&2
    exit 2
fi
"$PY" -c "import torch, platform; d = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'; \
print(f'device {d} | torch {torch.__version__} | python {platform.python_version()}')"

failures=0
run() {  # run NAME LIMIT_S COMMAND...
    local name=$1 limit=$(($2 * scale)) start=$SECONDS
    shift 2
    echo "== $name: $*"
    if timeout "$limit" "$@"; then
        echo "== $name: done in $((SECONDS - start)) s"
    else
        echo "== $name: FAILED (exit $?, after $((SECONDS - start)) s)"
        failures=$((failures + 1))
    fi
}

run noise 90 "$PY" bench/noise.py
run attention 300 "$PY" bench/attention.py --shapes 5b
run train_step 300 "$PY" bench/train_step.py --shape 5b --layers "$LAYERS" --steps 8 --warmup 3
# Its measured part runs 2 ranks, one device each: with fewer GPUs only the architecture figures.
sp_args=()
[ $smoke = 0 ] && [ "$("$PY" -c "import torch; print(torch.cuda.device_count())")" -lt 2 ] && sp_args=(--no-measure)
run sequence_parallel 60 "$PY" bench/sequence_parallel.py "${sp_args[@]}"
tag=cpu-smoke
[ $smoke = 0 ] && tag=$("$PY" -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
fp8_variants=i2v-compile,i2v-fp8-rowwise,i2v-fp8-tensorwise
[ $smoke = 1 ] && fp8_variants=i2v-fp8-tensorwise  # on a CPU each variant's inductor compile takes minutes
if "$PY" -c "import torchao" 2>/dev/null; then
    run train_step_fp8 300 "$PY" bench/train_step.py --shape 5b --layers "$LAYERS" --steps 8 --warmup 3 \
        --variants "$fp8_variants" --out "bench/results/train_step-5b-fp8-$tag.json"
else
    echo "== train_step_fp8: skipped, torchao does not import (../shared/tools/device-wheels.sh --with-fp8)"
fi

echo "== results (bench/results/*-$tag.json)"
"$PY" - "$tag" <<'EOF'
import json, pathlib, sys

tag = sys.argv[1]
keys = {"noise": ["speedup_vs_eager_b1", "speedup_vs_compile_b1", "fraction_of_copy_bw_b64"],
        "attention": ["fwd_tflops_5b", "bwd_tflops_5b", "fwd_bwd_speedup_vs_best_sdpa_5b"],
        "train_step-5b": ["speedups.i2v-auto_vs_stock", "speedups.i2v-auto_vs_stock-compile",
                          "planner.estimate_over_measured"],
        "train_step-5b-fp8": ["speedups.i2v-fp8-rowwise_vs_i2v-compile", "speedups.i2v-fp8-tensorwise_vs_i2v-compile"],
        "sequence_parallel": []}
for kind, wanted in keys.items():
    path = pathlib.Path(f"bench/results/{kind}-{tag}.json")
    if not path.exists():
        continue
    record = json.loads(path.read_text())
    figures = []
    for key in wanted:
        value = record
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        figures.append(f"{key}={value:.4g}" if isinstance(value, (int, float)) else f"{key}={value}")
    print(f"{path}: " + ", ".join(figures))
    for variant in record.get("variants", []):
        mfu = variant.get("mfu")
        print(f"    {variant['variant']}: {variant['step_s']:.3f} s/step, MFU {mfu if mfu is None else f'{mfu:.1%}'}, "
              f"peak {variant['peak_mem_gb']} GiB, attention {variant['profile']['attention']}")
EOF
exit $failures
