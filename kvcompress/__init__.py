"""kvcompress: KV-Compress on a KV cache paged per (layer, KV head)."""

__version__ = "0.1.0"
