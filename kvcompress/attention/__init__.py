"""Attention backends: the only place where models meet the paged cache."""

from kvcompress.attention.backend import AttentionBackend
from kvcompress.attention.metadata import AttentionMetadata
from kvcompress.attention.torch_backend import TorchAttentionBackend

__all__ = ["AttentionBackend", "AttentionMetadata", "TorchAttentionBackend"]
