"""``kvcompress serve``: the OpenAI-compatible server over one engine.

Heavy imports (torch, FastAPI, uvicorn) happen inside the command functions so that
``kvcompress --help`` stays fast.
"""

from __future__ import annotations

import argparse

from kvcompress.entrypoints.cli.args import (
    add_compression_args,
    add_engine_args,
    engine_config_from_args,
)


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
    add_engine_args(p)
    add_compression_args(p)
    p.set_defaults(func=run_serve)
    return p


def run_serve(args: argparse.Namespace) -> int:
    from kvcompress.engine import AsyncLLMEngine, LLMEngine
    from kvcompress.entrypoints.openai.app import build_app, model_name
    from kvcompress.entrypoints.openai.serving import GracefulServer, uvicorn_config

    engine = AsyncLLMEngine(LLMEngine(engine_config_from_args(args, max_queue=args.max_queue)))
    app = build_app(engine, model_name(args.model))
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
    return 0 if server.started else 1
