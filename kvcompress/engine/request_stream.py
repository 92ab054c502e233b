"""The caller's side of a request served by :class:`AsyncLLMEngine`: an async iterator of
its outputs that aborts the request when left early."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvcompress.engine.outputs import RequestOutput

if TYPE_CHECKING:
    from kvcompress.engine.async_engine import AsyncLLMEngine


def call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: Any) -> None:
    """Schedule ``fn`` on a caller's event loop from the engine thread."""
    # A closed loop means the caller is gone and nobody is waiting for the answer.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


class OutputChannel:
    """The caller's side of one request: outputs or an exception, in order."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        """Called from the engine thread."""
        call_soon(self.loop, self.queue.put_nowait, item)


class RequestStream:
    """An accepted request's outputs, as an async iterator.

    Leaving ``async with`` (or calling ``abort``) before the final output aborts the request,
    which frees its KV blocks; this is what a client disconnect turns into.
    """

    def __init__(self, engine: AsyncLLMEngine, stream: OutputChannel, prompt_tokens: int) -> None:
        self._engine = engine
        self._stream = stream
        self.request_id = stream.request_id
        self.prompt_tokens = prompt_tokens
        self.finished = False
        self._held: RequestOutput | None = None  # the next output, read ahead while merging

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        queue = self._stream.queue
        item, self._held = self._held or await queue.get(), None
        # Each output carries the full text so far, so a slow consumer may skip to the newest
        # one instead of working through a backlog token by token; what only the skipped
        # ones carried (their new tokens and logprobs) is merged into it. Outputs of another
        # choice (n > 1) are not merged: the next call returns it.
        while not isinstance(item, BaseException) and not item.finished and not queue.empty():
            newer = queue.get_nowait()
            if isinstance(newer, BaseException):
                item = newer
            elif newer.index != item.index or item.finish_reason is not None:
                self._held = newer
                break
            else:
                item = merge_outputs(item, newer)
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.abort()


def merge_outputs(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """``newer`` carrying also what only ``older`` held: its step's new tokens, their
    logprobs, and the prompt logprobs (which come once)."""
    logprobs = newer.logprobs
    if older.logprobs is not None:
        logprobs = older.logprobs + (newer.logprobs or [])
    return newer._replace(
        new_token_ids=older.new_token_ids + newer.new_token_ids,
        logprobs=logprobs,
        prompt_logprobs=older.prompt_logprobs or newer.prompt_logprobs,
        prompt_token_ids=older.prompt_token_ids or newer.prompt_token_ids,
    )
