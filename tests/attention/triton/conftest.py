"""Triton kernels run on CPU through Triton's interpreter when no GPU is present (the
suite's root conftest sets ``TRITON_INTERPRET`` before anything imports Triton)."""

from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
