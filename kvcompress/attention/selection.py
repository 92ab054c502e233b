"""Which attention backend an engine uses: ``--attention-backend {auto,torch,triton}``."""

from __future__ import annotations

import os

import torch

from kvcompress.attention.triton import available as triton_available
from kvcompress.cache import PagedKVCache

ATTENTION_BACKENDS = ("auto", "torch", "triton")


def resolve_backend(name: str, device: str | torch.device) -> str:
    """``"torch"`` or ``"triton"``; ``auto``: Triton on CUDA when installed, torch otherwise."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {ATTENTION_BACKENDS}")
    on_cuda = torch.device(device).type == "cuda"
    if name == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if name == "triton":
        if not triton_available():
            raise ValueError("attention backend 'triton' needs Triton (the 'cuda' extra)")
        if not on_cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise ValueError("attention backend 'triton' runs on CUDA (or with TRITON_INTERPRET=1)")
    return name


def make_backend(name: str, cache: PagedKVCache):
    """The backend ``name`` (after :func:`resolve_backend`) over ``cache``."""
    if resolve_backend(name, cache.config.device) == "triton":
        from kvcompress.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(cache)
    from kvcompress.attention.torch_backend import TorchAttentionBackend

    return TorchAttentionBackend(cache)
