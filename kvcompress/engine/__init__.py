"""The inference engine: scheduler, model runner, sampler and sequences on the paged cache."""

from kvcompress.engine.async_engine import AsyncLLMEngine, ChatPrompt, Prompt
from kvcompress.engine.config import EngineConfig
from kvcompress.engine.engine import LLMEngine
from kvcompress.engine.logprobs import MAX_LOGPROBS, TokenLogprob
from kvcompress.engine.outputs import (
    Capacity,
    EngineStats,
    KVStats,
    RequestOutput,
    RequestState,
    TeacherForceResult,
)
from kvcompress.engine.request_stream import RequestStream
from kvcompress.engine.sampling import SamplingParams

__all__ = [
    "MAX_LOGPROBS",
    "AsyncLLMEngine",
    "Capacity",
    "ChatPrompt",
    "EngineConfig",
    "EngineStats",
    "KVStats",
    "LLMEngine",
    "Prompt",
    "RequestOutput",
    "RequestState",
    "RequestStream",
    "SamplingParams",
    "TeacherForceResult",
    "TokenLogprob",
]
