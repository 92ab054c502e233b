"""kvcompress: KV-Compress on a KV cache paged per (layer, KV head).

The public API: the offline ``LLM``, the engine (``LLMEngine``, ``EngineConfig``) and the
parameters of a request (``SamplingParams``, ``CompressionParams``). Errors are in
:mod:`kvcompress.errors`.
"""

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["LLM", "CompressionParams", "EngineConfig", "LLMEngine", "SamplingParams"]

if TYPE_CHECKING:
    from kvcompress.compress import CompressionParams
    from kvcompress.engine import EngineConfig, LLMEngine, SamplingParams
    from kvcompress.entrypoints.llm import LLM

# Lazy, so that `import kvcompress.cache` does not pull in transformers.
_HOMES = {
    "LLM": "kvcompress.entrypoints.llm",
    "CompressionParams": "kvcompress.compress",
    "EngineConfig": "kvcompress.engine",
    "LLMEngine": "kvcompress.engine",
    "SamplingParams": "kvcompress.engine",
}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'kvcompress' has no attribute {name!r}")
