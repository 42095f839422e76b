"""Triton kernels, each with a plain-PyTorch twin; see `attention.py`."""
