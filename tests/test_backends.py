"""The one rule that turns a kernel choice (kernels.attention, kernels.noise) into an implementation."""

import pytest
import torch
import torch.nn.functional as F

from i2v.kernels.attention import flash_attention
from i2v.kernels.backends import BACKENDS, resolve_backend, triton_available
from i2v.kernels.noise import inject_noise


def test_auto_is_triton_on_cuda_when_triton_imports_else_torch():
    assert BACKENDS == ("auto", "triton", "torch")
    assert triton_available()  # the CPU machine has triton (the kernels run under its interpreter)
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", "cuda:1") == "triton"  # a device name is enough: nothing is allocated
    for choice in ("triton", "torch"):
        assert resolve_backend(choice, "cpu") == choice == resolve_backend(choice, "cuda")


def test_an_unknown_choice_names_the_setting():
    with pytest.raises(ValueError, match=r"kernels\.noise must be one of 'auto', 'triton', 'torch', got 'fused'"):
        resolve_backend("fused", "cpu", "kernels.noise")


def test_both_ops_follow_the_rule_on_cpu_tensors():
    # auto on CPU tensors is the torch path of each op, bit for bit.
    q = torch.randn(1, 2, 8, 16)
    assert torch.equal(flash_attention(q, q, q, backend="auto"), F.scaled_dot_product_attention(q, q, q))
    x0, img = torch.randn(2, 3, 4, 4, 4), torch.randn(2, 1, 4, 4, 4)
    a, s = torch.full((2,), 0.8), torch.full((2,), 0.6)
    auto = inject_noise(x0, img, a, s, seed=3, backend="auto")
    ref = inject_noise(x0, img, a, s, seed=3, backend="torch")
    assert all(torch.equal(x, y) for x, y in zip(auto, ref))
