"""Attention backends: the only place where models meet the paged cache."""

from typing import TYPE_CHECKING

from kvcompress.attention.backend import AttentionBackend
from kvcompress.attention.metadata import AttentionMetadata, DecodeMetadata, build_metadata

__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionBackend",
    "AttentionMetadata",
    "DecodeMetadata",
    "TorchAttentionBackend",
    "TritonAttentionBackend",
    "build_metadata",
    "make_backend",
    "resolve_backend",
    "triton_available",
]

if TYPE_CHECKING:
    from kvcompress.attention.selection import ATTENTION_BACKENDS, make_backend, resolve_backend
    from kvcompress.attention.torch_backend import TorchAttentionBackend
    from kvcompress.attention.triton import available as triton_available
    from kvcompress.attention.triton_backend import TritonAttentionBackend


def __getattr__(name: str):
    # Lazy: models import this package for the backend interface only, and the torch
    # implementation pulls in the compression core (metric kernels, workspace).
    if name == "TorchAttentionBackend":
        from kvcompress.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend
    if name == "TritonAttentionBackend":  # imports Triton
        from kvcompress.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend
    if name == "triton_available":  # whether Triton is installed (does not import it)
        from kvcompress.attention.triton import available

        return available
    if name in ("ATTENTION_BACKENDS", "make_backend", "resolve_backend"):
        from kvcompress.attention import selection

        return getattr(selection, name)
    raise AttributeError(f"module 'kvcompress.attention' has no attribute {name!r}")
