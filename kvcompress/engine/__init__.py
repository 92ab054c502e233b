"""The inference engine: scheduler, model runner, sampler and sequences on the paged cache."""

from kvcompress.engine.config import EngineConfig
from kvcompress.engine.engine import EngineStats, LLMEngine, QueueFullError, merge_compression
from kvcompress.engine.sampling import SamplingParams
from kvcompress.engine.sequence import KVStats, RequestOutput

__all__ = [
    "EngineConfig",
    "EngineStats",
    "KVStats",
    "LLMEngine",
    "QueueFullError",
    "RequestOutput",
    "SamplingParams",
    "merge_compression",
]
