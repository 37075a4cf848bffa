"""The common start of the kernel benchmarks.

Without CUDA the kernels run under the Triton interpreter, which must be switched on before any
kernel is defined; and a benchmark must also run from a bare checkout on a GPU machine where the
project is not installed, so the checkout's root goes on sys.path.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import re
import subprocess
import sys

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def load_kernel(name: str):
    """`i2v.kernels.<name>`, from the checkout when the project is not installed."""
    sys.path.insert(0, str(REPO))
    return importlib.import_module(f"i2v.kernels.{name}")


def git_commit(*paths: str) -> tuple[str | None, bool]:
    """(HEAD, whether `paths` have uncommitted changes); HEAD is None outside a git checkout."""
    def git(*args):
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else None

    return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--", *paths))


def write_result(kind: str, gpu: str, smoke: bool, record: dict, out: pathlib.Path | None = None) -> pathlib.Path:
    """Write `record` atomically to `out`, or to bench/results/<kind>-<gpu>.json (<kind>-cpu-smoke.json)."""
    if out is None:
        name = "cpu-smoke" if smoke else re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
        out = RESULTS / f"{kind}-{name}.json"
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return out
