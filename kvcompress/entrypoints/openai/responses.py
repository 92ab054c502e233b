"""Response shapes of the OpenAI-compatible API (bodies, stream chunks) and the streaming
delta tracker."""

from __future__ import annotations

import time
import uuid
from typing import Any

from kvcompress.engine import KVStats


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def kv_dict(kv: KVStats | None) -> dict[str, Any] | None:
    return kv.as_dict() if kv is not None else None


def model_list(model: str, created: int, max_model_len: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {
                "id": model,
                "object": "model",
                "created": created,
                "owned_by": "kvcompress",
                "max_model_len": max_model_len,
            }
        ],
    }


class DeltaTracker:
    """Turns the engine's growing full text into safe-to-send deltas.

    A stream cannot take text back, so until a request finishes, text that might still
    change is held back: a trailing U+FFFD (half of a multi-byte character) and a tail that
    could be the start of a stop string (the engine trims a stop string once it is whole).
    """

    def __init__(self, stop: tuple[str, ...]) -> None:
        self.stop = stop
        self.sent = ""

    def update(self, text: str, finished: bool) -> str:
        safe = text if finished else self._stable_prefix(text)
        if not safe.startswith(self.sent):
            # Cannot happen with a well-behaved engine; keep going with what was sent.
            return ""
        delta = safe[len(self.sent) :]
        self.sent = safe
        return delta

    def _stable_prefix(self, text: str) -> str:
        end = len(text)
        while end and text[end - 1] == "\ufffd":
            end -= 1
        hold = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, end), 0, -1):
                if text[end - k : end] == stop[:k]:
                    hold = max(hold, k)
                    break
        return text[: end - hold]


def _envelope(
    request_id: str, object_type: str, created: int, model: str, *choices: dict[str, Any]
) -> dict[str, Any]:
    """The fields every completion and chat body or chunk shares, around its choices."""
    return {
        "id": request_id,
        "object": object_type,
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": list(choices),
    }


def completion_body(
    request_id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str | None,
    logprobs: dict[str, Any] | None = None,
    index: int = 0,
) -> dict[str, Any]:
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return _envelope(request_id, "text_completion", created, model, choice)


def chat_body(
    request_id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str | None,
    logprobs: dict[str, Any] | None = None,
    index: int = 0,
) -> dict[str, Any]:
    message = {"role": "assistant", "content": text, "refusal": None}
    choice = {
        "index": index,
        "message": message,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
    }
    return _envelope(request_id, "chat.completion", created, model, choice)


def completion_chunk(
    request_id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
    index: int = 0,
) -> dict[str, Any]:
    # The legacy completions stream reuses the non-streaming object type.
    return completion_body(request_id, created, model, text, finish_reason, logprobs, index)


def chat_chunk(
    request_id: str,
    created: int,
    model: str,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
    index: int = 0,
) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return _envelope(request_id, "chat.completion.chunk", created, model, choice)


def usage_chunk(
    request_id: str, created: int, model: str, object_type: str, usage_: dict[str, int]
) -> dict[str, Any]:
    """The extra last chunk of ``stream_options.include_usage``: no choices, only usage."""
    return _envelope(request_id, object_type, created, model) | {"usage": usage_}
