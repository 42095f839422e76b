"""Shared test set-up.

Without CUDA, run Triton kernels in the Triton interpreter: `triton.jit` decides between compiling
and interpreting when a kernel is decorated, i.e. when its module is imported, so the variable
must be set here, before any test module imports minir1ci.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
