"""Triton kernels run on CPU through Triton's interpreter when no GPU is present.

The interpreter is chosen when a kernel is decorated, so the variable is set here, before
any test module imports Triton or the kernel modules.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
