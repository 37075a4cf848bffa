"""Triton kernels (installed as `i2v.kernels`): each file holds a kernel, its torch reference and its autograd.Function."""
