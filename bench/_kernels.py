"""The common start of the kernel benchmarks.

Without CUDA the kernels run under the Triton interpreter, which must be switched on before any
kernel is defined; and a benchmark must also run from a bare checkout on a GPU machine where the
project is not installed, so the kernel module is loaded from its file when `i2v.kernels` is absent.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
import sys

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def load_kernel(name: str):
    """`i2v.kernels.<name>` if installed, else kernels/<name>.py itself."""
    sys.path.insert(0, str(REPO))  # a kernel file may import i2v.diffusion
    try:
        return importlib.import_module(f"i2v.kernels.{name}")
    except ImportError:
        spec = importlib.util.spec_from_file_location(f"_{name}_kernel", REPO / "kernels" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
