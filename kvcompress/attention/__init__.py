"""Attention backends: the only place where models meet the paged cache."""

from kvcompress.attention.backend import AttentionBackend

__all__ = ["AttentionBackend"]
