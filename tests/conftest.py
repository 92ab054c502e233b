"""Suite-wide settings."""

from __future__ import annotations

import os

import torch

# Full argument checks in the cache's hot paths (off by default for speed): the tests
# exercise them, and a bad append fails loudly instead of corrupting the cache.
os.environ.setdefault("KVCOMPRESS_DEBUG", "1")

# Without a GPU, Triton kernels run in Triton's interpreter (tests/attention/triton). Set
# before anything imports Triton: a module imported earlier in the session (transformers
# imports it when installed) would otherwise fix the mode, and the kernel tests then fail
# when another directory's tests run first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
