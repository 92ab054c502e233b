"""``kvcompress serve``: the OpenAI-compatible server over one engine.

Heavy imports (torch, FastAPI, uvicorn) happen inside the command functions so that
``kvcompress --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os

from kvcompress.entrypoints.cli.args import (
    add_compression_args,
    add_engine_args,
    engine_config_from_args,
)
from kvcompress.entrypoints.openai.options import (
    DEFAULT_MAX_REQUEST_BYTES,
    EXPOSURES,
    LOOPBACK_HOSTS,
    ServerOptions,
    host_name,
)

API_KEY_ENV = "KVCOMPRESS_API_KEY"


def add_serve_parser(commands) -> argparse.ArgumentParser:
    p = commands.add_parser("serve", help="OpenAI-compatible HTTP server over the engine")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--max-queue",
        type=int,
        default=None,
        help="waiting requests allowed before answering 429 (default: unbounded)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    access = p.add_argument_group("access and limits")
    access.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every /v1 route "
        f"(default: ${API_KEY_ENV} if set, else no key)",
    )
    access.add_argument(
        "--served-model-name",
        default=None,
        help="the model id clients see and send (default: the model's own name); "
        "requests naming the model's own name are accepted too",
    )
    access.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="larger request bodies get 413 (default: %(default)s)",
    )
    for name, what in (("docs", "/docs, /redoc and /openapi.json"), ("metrics", "/metrics")):
        access.add_argument(
            f"--{name}",
            choices=EXPOSURES,
            default="protected",
            help=f"{what}: public, behind the API key when one is set (protected), or not "
            "served (off) (default: %(default)s)",
        )
    access.add_argument(
        "--allowed-hosts",
        default=None,
        help="comma-separated Host header names to serve, or '*' for any (default: "
        "localhost names when bound to loopback, else any)",
    )
    add_engine_args(p)
    add_compression_args(p)
    p.set_defaults(func=run_serve)
    return p


def allowed_hosts(option: str | None, bind: str) -> tuple[str, ...] | None:
    """The Host names to serve; None for any."""
    if option is None:
        # Bound to loopback, only this machine's browsers reach the server, and only a page
        # rebinding its own name to 127.0.0.1 sends another Host.
        loopback = bind in ("127.0.0.1", "localhost", "::1") or bind.startswith("127.")
        return (*LOOPBACK_HOSTS, host_name(bind)) if loopback else None
    names = tuple(host_name(h) for h in option.split(",") if h.strip())
    return None if "*" in names else names


def server_options(args: argparse.Namespace) -> ServerOptions:
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    return ServerOptions(
        api_key=api_key or None,
        max_request_bytes=args.max_request_bytes,
        docs=args.docs,
        metrics=args.metrics,
        allowed_hosts=allowed_hosts(args.allowed_hosts, args.host),
    )


def run_serve(args: argparse.Namespace) -> int:
    from kvcompress.engine import AsyncLLMEngine, LLMEngine
    from kvcompress.entrypoints.openai.app import build_app, model_name
    from kvcompress.entrypoints.openai.serving import GracefulServer, uvicorn_config

    options = server_options(args)  # before the model loads: a bad option fails at once
    engine = AsyncLLMEngine(LLMEngine(engine_config_from_args(args, max_queue=args.max_queue)))
    own_name = model_name(args.model)
    served = args.served_model_name or own_name
    app = build_app(engine, served, options=options, aliases=(own_name,))
    server = GracefulServer(uvicorn_config(app, args.host, args.port, args.log_level), engine)
    try:
        # uvicorn handles SIGINT/SIGTERM: it stops accepting and drains connections (the
        # engine ends those still open after a grace period), then the app's lifespan
        # shutdown stops the engine thread.
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it caught once it is done
        pass
    finally:
        engine.shutdown()  # idempotent; covers a failed startup too
    return 0 if server.started and not server.failed else 1
