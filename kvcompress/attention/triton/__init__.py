"""Triton kernels for the per-head paged cache (CUDA; on CPU under ``TRITON_INTERPRET=1``).

Importing this package does not import Triton: :func:`available` says whether it is
installed, and the kernel modules (``decode``, ``window``) import it themselves.

* ``decode.paged_decode``: one decode step's attention straight from the pools through each
  (layer, sequence, KV head)'s own block table and length, split-K for long heads, with the
  eviction metric added in the same kernel family.
* ``window.window_metric``: the prefill observation-window metric, without a float32
  ``[Hq, w, T]`` tensor.
"""

from __future__ import annotations

import importlib.util

from kvcompress.attention.triton.splits import SplitPlan, choose_splits


def available() -> bool:
    """Triton is installed (it runs on CUDA, or anywhere with ``TRITON_INTERPRET=1``)."""
    return importlib.util.find_spec("triton") is not None


__all__ = ["SplitPlan", "available", "choose_splits"]
