"""i2v: training system for CogVideoX-style image-to-video diffusion transformers."""

import importlib.abc as _abc
import importlib.machinery as _machinery
import logging as _logging
import sys as _sys

# torchao (model.fp8) is imported by i2v.model.fp8 when a config asks for float8. Against a torch it was not
# built for, its CUDA extensions do not load and torch warns about an enum it registers: float8 training
# (torch's scaled matmul, or its emulation on the CPU) needs neither, and the lines would open every log.
for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)


def _torchao_unavailable_to_diffusers(module) -> None:
    module._torchao_available = False


def _torchao_unavailable_to_transformers(module) -> None:
    module.is_torchao_available = lambda *args, **kwargs: False


class _LibrariesWithoutTorchao(_abc.MetaPathFinder):
    """diffusers and transformers import torchao at their own import whenever it is installed, for quantizers
    i2v does not use: 1.5-3 s in every process. Right after each library's import_utils module runs, this
    marks torchao unavailable to that library (before any of its other modules asks), so that only a
    float8 run imports torchao (i2v.model.fp8, directly)."""

    PATCHES = {"diffusers.utils.import_utils": _torchao_unavailable_to_diffusers,
               "transformers.utils.import_utils": _torchao_unavailable_to_transformers}

    def find_spec(self, fullname, path, target=None):
        patch = self.PATCHES.get(fullname)
        if patch is None:
            return None
        spec = _machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _PatchingLoader(spec.loader, patch)
        return spec


class _PatchingLoader(_abc.Loader):
    def __init__(self, loader, patch):
        self.loader, self.patch = loader, patch

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        self.patch(module)


if not any(isinstance(f, _LibrariesWithoutTorchao) for f in _sys.meta_path):
    _sys.meta_path.insert(0, _LibrariesWithoutTorchao())
