"""Triton kernels and the PyTorch references they are checked against."""
