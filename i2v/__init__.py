"""i2v: training system for CogVideoX-style image-to-video diffusion transformers."""

import logging as _logging

# torchao (model.fp8) is imported by diffusers whenever it is installed, in every process. Against a
# torch it was not built for, its CUDA extensions do not load, diffusers finds none of its quantised
# tensor classes, and torch warns about an enum torchao registers: float8 training (torch's own
# scaled matmul, or its emulation on the CPU) needs none of them, and the lines would open every log.
for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
