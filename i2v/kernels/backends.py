"""Which implementation a kernel choice (`kernels.attention`, `kernels.noise`) runs on a device.

One rule for every op, resolved here and nowhere else:

    auto    the Triton kernel when the tensors are on CUDA and triton imports, else the torch path
    triton  the Triton kernel (callers say what else it needs: on the CPU, TRITON_INTERPRET=1)
    torch   the plain-PyTorch path (for attention: torch's scaled_dot_product_attention)

A training run on CUDA resolves `kernels.attention: auto` by timing instead (i2v.kernels.attention_choice,
i2v.train.attention_auto); this rule remains its fallback and what every other caller gets.

`data.order: auto` (i2v.data.latent_order) is not a backend: it chooses the sample order from
where the shards are, and is resolved there.
"""

from __future__ import annotations

import functools

import torch

BACKENDS = ("auto", "triton", "torch")


@functools.cache
def triton_available() -> bool:
    """Whether triton imports (an optional extra; the torch paths need none of it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(choice: str, device, what: str = "backend") -> str:
    """'triton' or 'torch' for `choice` when the tensors are on `device` (a torch.device or a name).

    `what` names the setting in the error for a choice that is not one of `BACKENDS`."""
    if choice not in BACKENDS:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, BACKENDS))}, got {choice!r}")
    if choice == "auto":
        return "triton" if torch.device(device).type == "cuda" and triton_available() else "torch"
    return choice
