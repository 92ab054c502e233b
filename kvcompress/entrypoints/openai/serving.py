"""Running the app: uvicorn with graceful shutdown, or in a background thread."""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI

from kvcompress.engine import AsyncLLMEngine

logger = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


SHUTDOWN_GRACE_SECONDS = 5.0


def uvicorn_config(app: FastAPI, host: str, port: int, log_level: str = "info") -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        # A backstop only: GracefulServer ends open requests itself after its grace period.
        timeout_graceful_shutdown=int(SHUTDOWN_GRACE_SECONDS) + 10,
        lifespan="on",
    )


class GracefulServer(uvicorn.Server):
    """uvicorn that ends open requests cleanly on SIGINT/SIGTERM.

    uvicorn stops accepting connections and waits for open ones; a stream of hundreds of
    tokens would outlast that and be cut mid-event. After ``grace`` seconds this stops the
    engine instead, so every open stream ends with an error event and ``[DONE]`` and every
    waiting non-streaming request gets a 503. A second signal still forces the exit.
    """

    def __init__(
        self, config: uvicorn.Config, engine: AsyncLLMEngine, grace: float = SHUTDOWN_GRACE_SECONDS
    ) -> None:
        super().__init__(config)
        self.engine = engine
        self.grace = grace
        self.failed = False

    async def on_tick(self, counter: int) -> bool:
        failure = self.engine.failure  # a tensor-parallel rank died: nothing can run again
        if failure is not None:
            logger.error("%s; the server exits", failure)
            self.failed = True
            return True
        return await super().on_tick(counter)

    def handle_exit(self, sig: int, frame: Any) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        if first:
            timer = threading.Timer(self.grace, self.engine.shutdown)
            timer.daemon = True
            timer.start()


class BackgroundServer:
    """uvicorn in a background thread of this process (tests, the load benchmark).

    Signals stay with the main thread; ``stop`` asks uvicorn to exit, which runs the app's
    lifespan shutdown and so stops the engine thread too.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.server = uvicorn.Server(uvicorn_config(app, self.host, self.port, "warning"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
