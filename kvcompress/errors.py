"""Typed errors shared by every floor.

A request that can never run raises a ``RequestError`` (a ``ValueError``) that names the
parameter at fault and a stable ``code``, so that callers (the OpenAI server, the CLI) can
report it without reading the message. Codes follow the OpenAI error bodies where one exists.
"""

from __future__ import annotations


class RequestError(ValueError):
    """A request (or one of its parameters) that the engine cannot accept."""

    code = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class InvalidParameterError(RequestError):
    """A parameter out of range, of the wrong type, or unknown."""

    code = "invalid_parameter"


class ContextLengthError(RequestError):
    """The prompt (plus the tokens asked for) does not fit the model's context."""

    code = "context_length_exceeded"


class KVBudgetError(RequestError):
    """What the request must hold in the KV cache can never fit the cache."""

    code = "kv_cache_exceeded"


class QueueFullError(RuntimeError):
    """The waiting queue is at ``max_queue``; try again later."""

    code = "queue_full"


class EngineShutdownError(RuntimeError):
    """The engine stopped (or was never started) before the request could finish."""

    code = "unavailable"


class WorkerFailedError(EngineShutdownError):
    """A tensor-parallel rank died (or left the group out of step): the engine cannot go on."""


class RequestFailedError(RuntimeError):
    """The engine failed while running this request; the request was dropped."""

    code = "engine_error"
