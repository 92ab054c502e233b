"""An asyncio front for ``LLMEngine``: many concurrent callers, one engine thread.

``LLMEngine`` is not thread-safe, so exactly one background thread touches it. Callers hand
it commands (add, abort, call) through a lock-protected list; the thread runs them between
steps, so every request that arrives while a step is running joins the very next batch
(continuous batching across callers). Outputs travel back through one ``asyncio.Queue`` per
request, filled with ``loop.call_soon_threadsafe``. The thread sleeps on a condition
variable when there is nothing to do.

Prompts are tokenized (and chat templates applied) before they reach the engine thread, in
a small pool of tokenizer threads: a prompt of megabytes takes seconds to tokenize, and on
the engine thread every running stream would stop for that long. Prompts that cannot fit
the context are rejected there too, so they never cost the engine thread anything.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, TypeVar

from kvcompress.compress import CompressionParams
from kvcompress.engine.config import EngineConfig
from kvcompress.engine.engine import LLMEngine
from kvcompress.engine.outputs import EngineStats, RequestOutput
from kvcompress.engine.request_stream import OutputChannel, RequestStream, call_soon
from kvcompress.engine.sampling import SamplingParams
from kvcompress.errors import (
    ContextLengthError,
    EngineShutdownError,
    InvalidParameterError,
    RequestFailedError,
    WorkerFailedError,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class ChatPrompt:
    """Chat messages, rendered with the model's chat template in a tokenizer thread."""

    messages: list[dict[str, str]]


Prompt = str | list[int] | ChatPrompt


class ThroughputSample(NamedTuple):
    time: float
    prompt_tokens: int
    generation_tokens: int


class AsyncLLMEngine:
    """Owns an ``LLMEngine`` and the single thread that drives it."""

    def __init__(
        self,
        engine: LLMEngine | EngineConfig | None = None,  # or anything with its API (tests)
        *,
        throughput_window: float = 10.0,
        tokenizer_threads: int = 2,
    ) -> None:
        if engine is None or isinstance(engine, EngineConfig):
            engine = LLMEngine(engine)
        self.engine = engine
        self.max_model_len = engine.max_model_len
        self.throughput_window = throughput_window
        # Only tokenize / apply_chat_template run here: they read the tokenizer, never the
        # engine's state. More than one thread, so that one huge prompt does not hold up the
        # tokenization of every other request behind it.
        self._tokenizers = ThreadPoolExecutor(
            tokenizer_threads, thread_name_prefix="kvcompress-tokenize"
        )
        self._cond = threading.Condition()
        self._commands: list[Callable[[], None]] = []  # guarded by _cond
        self._stop = False  # guarded by _cond
        self._streams: dict[str, OutputChannel] = {}  # engine thread only
        self._thread: threading.Thread | None = None
        self._stats: EngineStats = engine.stats()  # replaced whole, so readers need no lock
        self._finished: Counter[str] = Counter()  # guarded by _counts_lock
        self._counts_lock = threading.Lock()
        self._samples: deque[ThroughputSample] = deque(maxlen=256)
        self.step_errors = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the engine thread (idempotent)."""
        if self._thread is not None:
            return
        # Daemon: a thread stuck in a long step must never keep the process alive on exit.
        self._thread = threading.Thread(target=self._run, name="kvcompress-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop

    @property
    def failure(self) -> str | None:
        """Why the engine can never run again (a tensor-parallel rank died), else None: a
        server reports it and exits."""
        try:
            self.engine.check_health()
        except WorkerFailedError as err:
            return str(err)
        return None

    def shutdown(self, timeout: float | None = 60.0) -> None:
        """Stop the engine thread; every request still in flight is aborted."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        # Tokenizations in progress finish; their requests then find the engine stopped.
        self._tokenizers.shutdown(wait=False)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def tokenizer(self) -> Any:
        """The engine's tokenizer, to read token ids back as text (logprobs, echo). Callers
        only read it, as the tokenizer threads do."""
        return self.engine.tokenizer

    # ------------------------------------------------------------------ requests
    async def add_request(
        self,
        prompt: Prompt,
        sampling: SamplingParams,
        compression: CompressionParams | Mapping[str, Any] | None = None,
        request_id: str | None = None,
        *,
        fit_max_tokens: bool = False,
    ) -> RequestStream:
        """Queue a request and wait until the engine has accepted it.

        Raises what ``LLMEngine.add_request`` raises (``ValueError``, ``QueueFullError``),
        ``ContextLengthError`` when prompt plus ``max_tokens`` exceed the model's context,
        ``InvalidParameterError`` for text that cannot be encoded, and
        ``EngineShutdownError``. With ``fit_max_tokens``, ``max_tokens`` is instead lowered to
        the room the prompt leaves (for callers that did not ask for a length).
        """
        loop = asyncio.get_running_loop()
        request_id = request_id or uuid.uuid4().hex
        if not self.is_running:
            raise EngineShutdownError("the engine is not running")
        try:
            token_ids = await loop.run_in_executor(self._tokenizers, self._encode, prompt)
        except RuntimeError as err:  # the pool was shut down: so is the engine
            if self._stop:
                raise EngineShutdownError("the engine is shutting down") from err
            raise
        sampling = self._fit(token_ids, sampling, fit_max_tokens)
        stream = OutputChannel(request_id, loop)
        accepted: asyncio.Future[int] = loop.create_future()

        def resolve(result: int | BaseException) -> None:
            def apply() -> None:
                if accepted.done():  # the caller gave up waiting
                    return
                if isinstance(result, BaseException):
                    accepted.set_exception(result)
                else:
                    accepted.set_result(result)

            call_soon(loop, apply)

        def add() -> None:
            try:
                prompt_len = self._add(token_ids, sampling, compression, stream)
            except Exception as err:
                resolve(err)
            else:
                resolve(prompt_len)

        if not self._submit(add):
            raise EngineShutdownError("the engine is not running")
        try:
            prompt_len = await accepted
        except asyncio.CancelledError:
            self.abort(request_id)  # runs after the add, so nothing is left behind
            raise
        return RequestStream(self, stream, prompt_len)

    async def generate(
        self,
        prompt: Prompt,
        sampling: SamplingParams,
        compression: CompressionParams | Mapping[str, Any] | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as its tokens arrive; errors from adding it come first.

        Cancelling the consumer (or closing the generator early) aborts the request.
        """
        stream = await self.add_request(prompt, sampling, compression, request_id)
        async with stream:
            async for output in stream:
                yield output

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread; its blocks return to the pool between steps."""
        # Once stopped there is nothing to abort: shutdown aborts every request itself.
        self._submit(lambda: self._abort(request_id, "abort"))

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run ``fn(engine)`` in the engine thread between steps and return its result."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()

        def run() -> None:
            try:
                result: Any = fn(self.engine)
                ok = True
            except Exception as err:
                result, ok = err, False

            def apply() -> None:
                if done.done():
                    return
                if ok:
                    done.set_result(result)
                else:
                    done.set_exception(result)

            call_soon(loop, apply)

        if not self._submit(run):
            raise EngineShutdownError("the engine is not running")
        return await done

    # ------------------------------------------------------------------ statistics
    def stats(self) -> EngineStats:
        """The engine's statistics as of the end of its last step (or command)."""
        return self._stats

    def finished_counts(self) -> dict[str, int]:
        """Requests ended so far, by finish reason ('stop', 'length', 'abort', 'error')."""
        with self._counts_lock:
            return dict(self._finished)

    def throughput(self, now: float | None = None) -> tuple[float, float]:
        """Prompt and generation tokens per second over the last ``throughput_window`` s."""
        now = time.monotonic() if now is None else now
        stats = self._stats
        window = self.throughput_window
        # The newest sample at least one window old, else the oldest. The engine thread
        # samples at least every 0.25 s while busy and once when it goes idle, so counters
        # hardly move between that sample and ``now - window``.
        base: ThroughputSample | None = None
        for sample in list(self._samples):
            if base is None or sample.time <= now - window:
                base = sample
        if base is None:
            return 0.0, 0.0
        span = min(now - base.time, window)
        if span <= 0:
            return 0.0, 0.0
        return (
            (stats.prompt_tokens - base.prompt_tokens) / span,
            (stats.generation_tokens - base.generation_tokens) / span,
        )

    # ------------------------------------------------------------------ engine thread
    def _submit(self, command: Callable[[], None]) -> bool:
        """Queue a command for the engine thread; False once the engine has stopped."""
        with self._cond:
            if self._stop or self._thread is None:
                return False
            self._commands.append(command)
            self._cond.notify()
            return True

    def _encode(self, prompt: Prompt) -> list[int]:
        """The prompt's token ids; runs in a tokenizer thread."""
        if isinstance(prompt, ChatPrompt):
            for message in prompt.messages:
                _check_encodable(message.get("content") or "", "messages")
            return self.engine.apply_chat_template(prompt.messages)
        if isinstance(prompt, str):
            _check_encodable(prompt, "prompt")
            return self.engine.tokenize(prompt)
        return list(prompt)

    def _fit(
        self, token_ids: list[int], sampling: SamplingParams, fit_max_tokens: bool
    ) -> SamplingParams:
        """Reject what cannot fit the context before it reaches the engine thread."""
        n = len(token_ids)
        if n >= self.max_model_len:
            raise ContextLengthError(
                f"the prompt has {n} tokens; the model's context is {self.max_model_len} "
                "tokens, including at least one generated token",
                param="prompt",
            )
        room = self.max_model_len - n
        if sampling.max_tokens <= room:
            return sampling
        if not fit_max_tokens:
            raise ContextLengthError(
                f"the model's context is {self.max_model_len} tokens, but "
                f"{n + sampling.max_tokens} were requested "
                f"({n} in the prompt, {sampling.max_tokens} in max_tokens); "
                f"lower max_tokens to at most {room} or shorten the prompt",
                param="max_tokens",
            )
        return replace(sampling, max_tokens=room)

    def _add(
        self,
        token_ids: list[int],
        sampling: SamplingParams,
        compression: CompressionParams | Mapping[str, Any] | None,
        stream: OutputChannel,
    ) -> int:
        if self._stop:
            raise EngineShutdownError("the engine is shutting down")
        # The engine itself rejects token ids outside the vocabulary and prompts beyond the
        # KV budget.
        self.engine.add_request(token_ids, sampling, compression, stream.request_id)
        self._streams[stream.request_id] = stream
        return len(token_ids)

    def _abort(self, request_id: str, reason: str, error: BaseException | None = None) -> None:
        stream = self._streams.pop(request_id, None)
        try:
            self.engine.abort_request(request_id)
        except Exception:
            logger.exception("aborting request %s failed", request_id)
        if stream is None:
            return  # already finished, or never accepted
        self._count(reason)
        if error is not None:
            stream.put(error)
        else:
            stream.put(RequestOutput(request_id, "", [], 0, 0, True, "abort", None, []))

    def _count(self, reason: str) -> None:
        with self._counts_lock:
            self._finished[reason] += 1

    def _run(self) -> None:
        busy = False
        last_sample = 0.0
        while True:
            with self._cond:
                while not (self._commands or self._stop or busy):
                    self._cond.wait()
                commands, self._commands = self._commands, []
                stop = self._stop
            for command in commands:
                try:
                    command()
                except Exception:  # a command must never take the engine thread down
                    logger.exception("engine command failed")
            if stop:
                break
            if commands:  # adds and aborts show in stats() without waiting for a step
                self._refresh_stats()
            if self.engine.has_unfinished_requests():
                self._step()
            busy = self.engine.has_unfinished_requests()
            self._refresh_stats()
            now = time.monotonic()
            if now - last_sample >= 0.25 or not busy:
                last_sample = now
                stats = self._stats
                self._samples.append(
                    ThroughputSample(now, stats.prompt_tokens, stats.generation_tokens)
                )
        self._abort_all(EngineShutdownError("the server is shutting down"))
        with self._cond:  # commands that raced with the stop still get an answer
            commands, self._commands = self._commands, []
        for command in commands:
            try:
                command()
            except Exception:
                logger.exception("engine command failed during shutdown")
        self._refresh_stats()
        self.engine.close()  # stops tensor-parallel ranks; nothing on one device

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except WorkerFailedError as err:
            # No step can run again: every request fails and the engine thread stops.
            logger.error("%s", err)
            self.step_errors += 1
            self._abort_all(err)
            with self._cond:
                self._stop = True
            return
        except Exception as err:
            self.step_errors += 1
            logger.exception("engine step failed; failing the requests it was running")
            self._fail_running(err)
            return
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:  # aborted while the step ran
                continue
            if output.finished:
                del self._streams[output.request_id]
                self._count(output.finish_reason or "stop")
            stream.put(output)

    def _fail_running(self, err: Exception) -> None:
        # LLMEngine does not say which requests a failed step touched; the running batch is
        # the best guess. When nothing is running the failure is in admission, so everything
        # still queued is failed rather than retried forever.
        in_flight = self.engine.requests_in_flight()
        running = [r.request_id for r in in_flight if r.status == "running"]
        victims = running if any(r in self._streams for r in running) else list(self._streams)
        for request_id in victims:
            self._abort(request_id, "error", RequestFailedError(f"the engine failed: {err}"))

    def _abort_all(self, error: BaseException) -> None:
        for request_id in list(self._streams):
            self._abort(request_id, "abort", error)

    def _refresh_stats(self) -> None:
        try:
            self._stats = self.engine.stats()
        except Exception:
            logger.exception("reading engine statistics failed")


def _check_encodable(text: str, param: str) -> None:
    """Text from JSON may hold lone UTF-16 surrogates ("\\ud800"), which no tokenizer can
    encode; say so instead of passing on the tokenizer's internal error."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        char = text[err.start]
        raise InvalidParameterError(
            f"the {param} cannot be encoded as UTF-8: a lone surrogate {char!r} at character "
            f"{err.start}; send valid Unicode text",
            param=param,
        ) from None
