"""Triton kernels (installed as `i2v.kernels`): each op's file holds a kernel, its torch reference and its
autograd.Function; `backends` holds the one rule that picks the kernel or the torch path for a device."""
