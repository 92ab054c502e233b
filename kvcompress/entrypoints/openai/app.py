"""The FastAPI app: OpenAI-compatible endpoints over one ``AsyncLLMEngine``.

Every error leaves as OpenAI's ``{"error": {...}}`` body, including FastAPI's own
validation errors (400, not 422), unknown routes and unexpected exceptions, so that clients
built for OpenAI report them properly and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvcompress.engine import (
    AsyncLLMEngine,
    ChatPrompt,
    Prompt,
    RequestOutput,
    RequestStream,
    SamplingParams,
)
from kvcompress.entrypoints.openai import protocol as p
from kvcompress.entrypoints.openai import responses as r
from kvcompress.entrypoints.openai.guard import RequestGuard
from kvcompress.entrypoints.openai.logprobs import (
    ChatLogprobs,
    CompletionLogprobs,
    Entry,
    TokenTexts,
    entries,
)
from kvcompress.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from kvcompress.entrypoints.openai.options import ServerOptions
from kvcompress.errors import (
    EngineShutdownError,
    QueueFullError,
    RequestError,
    RequestFailedError,
)

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DISCONNECT_POLL_SECONDS = 0.5


def model_name(model: str | None) -> str:
    """The model's own name: the last part of its path (a directory, or a ``.gguf`` file
    without the suffix). Never the whole path, which is no client's business."""
    if model is None:
        return DEFAULT_MODEL_NAME
    name = PurePath(model.rstrip("/\\")).name or model
    return name.removesuffix(".gguf")


@dataclass
class _Call:
    """What one endpoint call turns into, whether streamed or not."""

    kind: str  # "completion" | "chat"
    request_id: str
    created: int
    stream: RequestStream
    body: p.CommonRequest
    stop: tuple[str, ...]
    arrival: float
    echo: str = ""  # the prompt's text, put before the completion's (completions' echo)
    logprobs: CompletionLogprobs | ChatLogprobs | None = None  # when the request asked


class _Timing:
    """First-token and inter-token latency of one request, for the histograms."""

    def __init__(self, metrics: ServerMetrics, arrival: float) -> None:
        self.metrics = metrics
        self.arrival = arrival
        self.first: float | None = None
        self.tokens = 0

    def observe(self, out: RequestOutput) -> None:
        now = time.perf_counter()
        if self.first is None and out.token_ids:
            self.first = now
            self.metrics.time_to_first_token.observe(now - self.arrival)
        self.tokens = len(out.token_ids)
        if out.finished and self.first is not None:
            self.metrics.request_latency.observe(now - self.arrival)
            if self.tokens > 1:
                self.metrics.inter_token_latency.observe((now - self.first) / (self.tokens - 1))


def build_app(
    engine: AsyncLLMEngine,
    served_model: str,
    *,
    manage_engine: bool = True,
    options: ServerOptions | None = None,
    aliases: Iterable[str] = (),
) -> FastAPI:
    """The app for ``engine``; with ``manage_engine`` its lifespan starts and stops it.

    ``served_model`` is the id ``/v1/models`` lists; requests may name it or one of
    ``aliases`` (the model's own name, when it is served under another).
    """
    options = options or ServerOptions()
    accepted = {served_model, *aliases}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                # A step may run for a while on CPU; do not block the event loop meanwhile.
                await asyncio.to_thread(engine.shutdown)

    docs = options.docs != "off"
    app = FastAPI(
        title="kvcompress",
        version="0.1.0",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    metrics = ServerMetrics(engine, served_model)
    texts = TokenTexts(engine.tokenizer)
    created = r.now()
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.options = options
    app.add_middleware(
        RequestGuard,
        options=options,
        on_reject=lambda status: metrics.rejected.labels(str(status)).inc(),
    )

    def reject(err: p.APIError) -> JSONResponse:
        metrics.rejected.labels(str(err.status)).inc()
        headers = {"Retry-After": "1"} if err.status == 429 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(p.APIError)
    async def api_error(_: Request, err: p.APIError) -> JSONResponse:
        return reject(err)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        return reject(p.validation_error(list(err.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if err.status_code == 404 else None
        return JSONResponse(
            p.error_body(str(err.detail), code=code),
            status_code=err.status_code,
            headers=getattr(err, "headers", None),
        )

    @app.exception_handler(Exception)
    async def internal_error(_: Request, err: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return JSONResponse(
            p.error_body(f"internal server error: {err}", type="server_error"), status_code=500
        )

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.failure is not None:
            return JSONResponse({"status": engine.failure}, status_code=503)
        if not engine.is_running:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return r.model_list(served_model, created, engine.max_model_len)

    if options.metrics != "off":

        @app.get("/metrics")
        async def prometheus() -> Response:
            return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/v1/completions")
    async def completions(body: p.CompletionRequest, request: Request) -> Response:
        arrival = time.perf_counter()
        check_model(body)
        return await serve(request, body, body.single_prompt(), "completion", arrival)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> Response:
        arrival = time.perf_counter()
        check_model(body)
        prompt = ChatPrompt([m.as_template_message() for m in body.messages])
        return await serve(request, body, prompt, "chat", arrival)

    def check_model(body: p.CommonRequest) -> None:
        if body.model is not None and body.model not in accepted:
            raise p.APIError(
                f"the model {body.model!r} does not exist; this server serves {served_model!r}",
                404,
                param="model",
                code="model_not_found",
            )

    async def serve(
        request: Request, body: p.CommonRequest, prompt: Prompt, kind: str, arrival: float
    ) -> Response:
        body.check_supported()
        asked = body.requested_max_tokens()
        default = COMPLETIONS_DEFAULT_MAX_TOKENS if kind == "completion" else engine.max_model_len
        sampling = body.sampling_params(default)
        compression = body.compression_overrides()
        request_id = r.new_id("cmpl" if kind == "completion" else "chatcmpl")
        param = "prompt" if kind == "completion" else "messages"
        stream = await _add(engine, prompt, sampling, compression, request_id, asked, param)
        echo = ""
        if isinstance(body, p.CompletionRequest) and body.echo:
            echo = prompt if isinstance(prompt, str) else texts.decode(list(prompt))
        logprobs = None
        if sampling.logprobs is not None:
            logprobs = (CompletionLogprobs if kind == "completion" else ChatLogprobs)(texts)
        call = _Call(
            kind, request_id, r.now(), stream, body, sampling.stop, arrival, echo, logprobs
        )
        if body.stream:
            return _EventStream(_sse(call, served_model, metrics), on_close=stream.abort)
        return await _complete(call, served_model, metrics, request)

    return app


async def _add(
    engine: AsyncLLMEngine,
    prompt: Prompt,
    sampling: SamplingParams,
    compression: dict[str, Any],
    request_id: str,
    asked: int | None,
    param: str,
) -> RequestStream:
    """Queue the request; the engine's typed errors become OpenAI error bodies."""
    try:
        return await engine.add_request(
            prompt, sampling, compression, request_id, fit_max_tokens=asked is None
        )
    except QueueFullError as err:
        message = f"{err}; retry later"
        raise p.APIError(message, 429, type="rate_limit_error", code=err.code) from err
    except EngineShutdownError as err:
        raise p.APIError(str(err), 503, type="server_error", code=err.code) from err
    except RequestError as err:
        # The engine names the prompt "prompt"; chat requests carry it in "messages".
        where = param if err.param == "prompt" else err.param
        raise p.APIError(str(err), param=where, code=err.code) from err


async def _complete(call: _Call, model: str, metrics: ServerMetrics, request: Request) -> Response:
    timing = _Timing(metrics, call.arrival)
    # Per choice: every token's logprobs, the prompt's first when echoed (choice 0).
    found: dict[int, list[Entry]] = {}
    finals: dict[int, RequestOutput] = {}  # each choice's last output

    async def consume() -> RequestOutput | None:
        final = None
        async for out in call.stream:
            timing.observe(out)
            if call.logprobs is not None:
                found.setdefault(out.index, []).extend(entries(out))
            finals[out.index] = final = out
        return final

    async with call.stream:  # leaving early (disconnect, error) aborts the request
        task = asyncio.ensure_future(consume())
        try:
            final = await _until_disconnected(task, request)
        except RequestFailedError as err:
            return JSONResponse(p.error_body(str(err), type="server_error"), status_code=500)
        except EngineShutdownError as err:
            body = p.error_body(str(err), type="server_error", code="unavailable")
            return JSONResponse(body, status_code=503)
    if final is None:  # the client left; nobody will read this
        return Response(status_code=499)
    build = r.completion_body if call.kind == "completion" else r.chat_body
    choices = []
    for index, out in sorted(finals.items()):
        logprobs = call.logprobs.part(found.get(index, [])) if call.logprobs else None
        text = call.echo + out.text
        choice = build(
            call.request_id, call.created, model, text, out.finish_reason, logprobs, index
        )["choices"][0]
        if len(finals) > 1:
            choice["kv"] = r.kv_dict(out.kv)  # each choice's own (shared blocks: see KVStats)
        choices.append(choice)
    first = finals[min(finals)]
    body = build(call.request_id, call.created, model, "", None)
    body["choices"] = choices
    generated = sum(len(out.token_ids) for out in finals.values())
    body["usage"] = r.usage(final.prompt_tokens, generated)
    body["kv"] = r.kv_dict(first.kv)
    return JSONResponse(body)


async def _until_disconnected(task: asyncio.Future, request: Request) -> Any:
    """The task's result, or None (task cancelled) once the client has disconnected.

    A plain (non-streaming) endpoint is not cancelled when its client goes away, so a
    request stuck in the queue or generating would hold its KV blocks for nothing.
    """
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


class _EventStream(StreamingResponse):
    """An SSE response that aborts its request however the response ends.

    The generator's own cleanup does not run if the client leaves before the first chunk
    is pulled; this does, so the request's KV blocks always return to the pool.
    """

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _sse_event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _sse(call: _Call, model: str, metrics: ServerMetrics) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's format; a disconnect cancels this and aborts."""
    trackers: dict[int, r.DeltaTracker] = {}  # per choice
    timing = _Timing(metrics, call.arrival)
    rid, created = call.request_id, call.created
    chunk: Callable[[str, str | None, dict[str, Any] | None, int], dict[str, Any]]
    if call.kind == "completion":
        object_type = "text_completion"

        def chunk(text: str, finish: str | None, lp: dict[str, Any] | None, i: int) -> dict:
            return r.completion_chunk(rid, created, model, text, finish, lp, i)
    else:
        object_type = "chat.completion.chunk"

        def chunk(text: str, finish: str | None, lp: dict[str, Any] | None, i: int) -> dict:
            delta = {"content": text} if text or finish is None else {}
            return r.chat_chunk(rid, created, model, delta, finish, lp, i)

    echoes = dict.fromkeys(range(call.body.n), call.echo)  # each choice's first chunk
    generated: dict[int, int] = {}

    def logprobs_of(out: RequestOutput) -> dict[str, Any] | None:
        """The logprobs of this output's tokens; None when there are none to send."""
        if call.logprobs is None:
            return None
        found = entries(out)
        return call.logprobs.part(found) if found else None

    async with call.stream:
        try:
            if call.kind == "chat":
                for i in range(call.body.n):
                    role = {"role": "assistant"}
                    yield _sse_event(r.chat_chunk(rid, created, model, role, index=i))
            final: RequestOutput | None = None
            first_kv = None
            async for out in call.stream:
                timing.observe(out)
                i = out.index
                tracker = trackers.setdefault(i, r.DeltaTracker(call.stop))
                done = out.finish_reason is not None  # this choice's last output
                delta = tracker.update(out.text, done)
                # Each chunk carries the logprobs of its tokens, even while its text is held
                # back (a partial character, a possible stop string).
                lp = logprobs_of(out)
                echo = echoes.pop(i, "")
                if done:
                    generated[i] = len(out.token_ids)
                    last = chunk(echo + delta, out.finish_reason, lp, i)
                    last["kv"] = r.kv_dict(out.kv)
                    first_kv = first_kv or last["kv"]
                    yield _sse_event(last)
                elif delta or echo or lp is not None:
                    yield _sse_event(chunk(echo + delta, None, lp, i))
                else:
                    echoes[i] = echo
                if out.finished:
                    final = out
                    if call.body.include_usage:
                        usage = r.usage(out.prompt_tokens, sum(generated.values()))
                        closing = r.usage_chunk(rid, created, model, object_type, usage)
                        closing["kv"] = first_kv
                        yield _sse_event(closing)
            if final is None:
                raise RequestFailedError("the request ended without a final output")
        except (RequestFailedError, EngineShutdownError) as err:
            yield _sse_event(p.error_body(str(err), type="server_error"))
        yield "data: [DONE]\n\n"
