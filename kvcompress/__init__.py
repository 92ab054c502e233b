"""kvcompress: KV-Compress on a KV cache paged per (layer, KV head)."""

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["LLM", "CompressionParams", "SamplingParams"]

if TYPE_CHECKING:
    from kvcompress.compress import CompressionParams
    from kvcompress.engine import SamplingParams
    from kvcompress.entrypoints.llm import LLM


def __getattr__(name: str):
    # Lazy, so that `import kvcompress.cache` does not pull in transformers.
    if name == "LLM":
        from kvcompress.entrypoints.llm import LLM

        return LLM
    if name == "SamplingParams":
        from kvcompress.engine import SamplingParams

        return SamplingParams
    if name == "CompressionParams":
        from kvcompress.compress import CompressionParams

        return CompressionParams
    raise AttributeError(f"module 'kvcompress' has no attribute {name!r}")
