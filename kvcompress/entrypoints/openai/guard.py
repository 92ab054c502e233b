"""What stands between the network and the routes: the Host check, the API key and the
request body limit, as one ASGI middleware.

It runs before FastAPI reads anything, in this order, so that each check costs the least:
a wrong Host or a missing key is answered from the headers alone, and a body is read (and
counted) only for a caller who may send one. Every refusal is an OpenAI-shaped error body.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from starlette.responses import JSONResponse

from kvcompress.entrypoints.openai.options import ServerOptions, host_name
from kvcompress.entrypoints.openai.protocol import error_body


class RequestGuard:
    """ASGI middleware: Host, then API key, then body size."""

    def __init__(self, app: Any, options: ServerOptions, on_reject: Callable[[int], None]) -> None:
        self.app = app
        self.options = options
        self.on_reject = on_reject  # counts refusals by status (the server's metrics)
        self.key = options.api_key.encode() if options.api_key else None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", ())}
        refusal = self._check_headers(scope["path"], headers)
        if refusal is None:
            receive, refusal = await self._read_body(receive, headers.get(b"content-length"))
        if refusal is not None:
            self.on_reject(refusal.status_code)
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _check_headers(self, path: str, headers: dict[bytes, bytes]) -> JSONResponse | None:
        allowed = self.options.allowed_hosts
        if allowed is not None:
            host = host_name(headers.get(b"host", b"").decode("latin-1"))
            if host not in allowed:
                return _refuse(400, f"the Host header {host!r} is not served here", "invalid_host")
        if self.key is not None and self.options.needs_key(path):
            given = _bearer(headers.get(b"authorization"))
            # compare_digest takes as long whatever prefix matches: no timing oracle.
            if given is None or not hmac.compare_digest(given, self.key):
                message = (
                    "no API key given; send it as 'Authorization: Bearer <key>'"
                    if given is None
                    else "incorrect API key provided"
                )
                return _refuse(401, message, "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        return None

    async def _read_body(
        self, receive: Callable, length: bytes | None
    ) -> tuple[Callable, JSONResponse | None]:
        """The whole body, read up to the limit and handed on; or a 413.

        Content-Length is checked first (nothing is read), and the bytes are counted as they
        arrive too, so a chunked upload, which has no Content-Length, cannot get around it.
        """
        limit = self.options.max_request_bytes
        too_large = _refuse(
            413,
            f"the request body is larger than this server's limit of {limit} bytes",
            "request_too_large",
            {"Connection": "close"},
        )
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return receive, _refuse(400, "the Content-Length header is not a number")
            if declared > limit:
                return receive, too_large
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                return _replay([message], receive), None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return receive, too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        return _replay([body], receive), None


def _replay(messages: list[dict], receive: Callable) -> Callable:
    """A ``receive`` that first gives back what was read, then goes on (disconnects)."""

    async def replay() -> dict:
        if messages:
            return messages.pop(0)
        return await receive()

    return replay


def _bearer(header: bytes | None) -> bytes | None:
    if header is None:
        return None
    scheme, _, token = header.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return None
    return token.strip()


def _refuse(
    status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, code=code), status_code=status, headers=headers)
