"""Attention backends: the only place where models meet the paged cache."""

from typing import TYPE_CHECKING

from kvcompress.attention.backend import AttentionBackend
from kvcompress.attention.metadata import AttentionMetadata, DecodeMetadata

__all__ = ["AttentionBackend", "AttentionMetadata", "DecodeMetadata", "TorchAttentionBackend"]

if TYPE_CHECKING:
    from kvcompress.attention.torch_backend import TorchAttentionBackend


def __getattr__(name: str):
    # Lazy: models import this package for the backend interface only, and the torch
    # implementation pulls in the compression core (metric kernels, workspace).
    if name == "TorchAttentionBackend":
        from kvcompress.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend
    raise AttributeError(f"module 'kvcompress.attention' has no attribute {name!r}")
