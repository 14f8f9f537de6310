"""Triton kernels (DESIGN.md §7). Being written: until then no shape is supported."""


def supports(op, *tensors):
    return False
