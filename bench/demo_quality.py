"""Record what `make demo` showed: its evaluation figures, the commit, and the time of every stage.

    python bench/demo_quality.py --eval runs/demo/eval.json --total 312 \
        --stage "vae 0 kept" --stage "train 80 ran" ... [--out bench/results/demo-quality.json]

`launcher/demo.sh` calls it last. Each `--stage` is "NAME SECONDS ran|kept" ("kept": finished in an
earlier run and reused, so its time is not a measurement). The load average at the end is recorded
with the times, since the CPU may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _kernels import RESULTS, git_commit, write_result  # noqa: E402


def stage(text: str) -> tuple[str, dict]:
    try:
        name, seconds, how = text.split()
        if how not in ("ran", "kept"):
            raise ValueError(how)
        return name, {"seconds": int(seconds), "kept": how == "kept"}
    except ValueError:
        raise SystemExit(f"--stage: expected 'NAME SECONDS ran|kept', got {text!r}") from None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval", required=True, help="the run's eval.json")
    p.add_argument("--total", type=int, required=True, help="seconds of the whole demo")
    p.add_argument("--stage", action="append", default=[], help="'NAME SECONDS ran|kept'; repeat per stage")
    p.add_argument("--out", default=str(RESULTS / "demo-quality.json"))
    a = p.parse_args(argv)
    with open(a.eval) as f:
        report = json.load(f)
    commit, dirty = git_commit()
    record = {
        "commit": commit,
        "dirty": dirty,
        "pairs": report["pairs"],
        "first_frame_fidelity": report["first_frame_fidelity"],
        "caption_motion": report["caption_motion"],
        "targets": report["targets"],
        "meets_targets": report["meets_targets"],
        "ablations": {name: {k: s[k] for k in ("first_frame_fidelity", "caption_motion")}
                      for name, s in report["ablations"].items()},
        "seed": report["seed"],
        "sampler": report["sampler"],
        "stages": dict(stage(s) for s in a.stage),
        "total_seconds": a.total,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    write_result("demo-quality", "cpu", False, record, out=a.out)
    return record


if __name__ == "__main__":
    main()
