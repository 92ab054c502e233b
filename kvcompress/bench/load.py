"""``kvcompress bench load``: the HTTP server under concurrent streaming clients.

For each compression rate the server runs in this process on a free loopback port with that
rate as its default; N asyncio clients stream completions of long prompts back to back for
T seconds. Compression lets more sequences share the same KV memory, which shows up as
throughput and latency at a fixed budget. Everything is bounded: clients stop starting
requests at the deadline and requests still open a grace period later are cancelled.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from kvcompress.entrypoints.cli.args import parse_rates


@dataclass
class LoadConfig:
    clients: int = 8
    duration: float = 30.0  # seconds of new requests per rate
    prompt_len: int = 512  # tokens
    max_tokens: int = 64
    rates: tuple[float, ...] = (1, 8)  # 1: compression off
    kv_cache_memory: str = "48MiB"
    model: str | None = None
    block_size: int = 16
    max_num_seqs: int = 64
    policy: str = "kvcompress"
    protected_window: int = 32
    grace: float = 60.0  # after the deadline, open requests get this long to finish

    def __post_init__(self) -> None:
        if self.clients < 1 or self.duration <= 0 or self.prompt_len < 1 or self.max_tokens < 1:
            raise ValueError("clients, duration, prompt_len and max_tokens must be positive")
        if not self.rates or any(r < 1 for r in self.rates):
            raise ValueError(f"rates must be numbers >= 1, got {self.rates}")


@dataclass
class RequestRecord:
    start: float
    first: float | None = None
    end: float | None = None
    tokens: int = 0
    gaps: list[float] = field(default_factory=list)  # between consecutive streamed chunks
    compression_rate: float | None = None
    error: str | None = None


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


async def _one_request(client, url: str, prompt: list[int], cfg: LoadConfig) -> RequestRecord:
    body = {
        "prompt": prompt,
        "max_tokens": cfg.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,  # every request generates exactly max_tokens
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    rec = RequestRecord(start=time.perf_counter())
    last = None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            rec.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
            return rec
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                rec.error = event["error"].get("message", "error")
                return rec
            now = time.perf_counter()
            if event.get("choices") and event["choices"][0].get("text"):
                if rec.first is None:
                    rec.first = now
                else:
                    rec.gaps.append(now - last)
                last = now
            if event.get("usage"):
                rec.tokens = event["usage"]["completion_tokens"]
            if event.get("kv"):
                rec.compression_rate = event["kv"]["compression_rate"]
    rec.end = time.perf_counter()
    return rec


async def _client(
    client, url: str, prompts: list[list[int]], index: int, deadline: float, cfg: LoadConfig
) -> list[RequestRecord]:
    records = []
    k = index
    while time.perf_counter() < deadline:
        try:
            records.append(await _one_request(client, url, prompts[k % len(prompts)], cfg))
        except Exception as err:  # keep measuring; the failure is reported in the row
            records.append(RequestRecord(time.perf_counter(), error=repr(err)))
        k += cfg.clients
    return records


async def drive(url: str, prompts: list[list[int]], cfg: LoadConfig) -> tuple[list, float]:
    """Run the clients against ``url``; returns their records and the measured seconds."""
    import httpx

    limits = httpx.Limits(max_connections=cfg.clients + 4)
    timeout = httpx.Timeout(cfg.duration + cfg.grace)
    start = time.perf_counter()
    deadline = start + cfg.duration
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        tasks = [
            asyncio.create_task(_client(client, url, prompts, i, deadline, cfg))
            for i in range(cfg.clients)
        ]
        done, pending = await asyncio.wait(tasks, timeout=cfg.duration + cfg.grace)
        for task in pending:  # bounded: requests still open after the grace period are cut
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    records = [r for t in done for r in t.result()]
    ends = [r.end for r in records if r.end is not None]
    elapsed = (max(ends) if ends else time.perf_counter()) - start
    return records, elapsed


def summarize(rate: float, records: list[RequestRecord], elapsed: float, stats) -> dict[str, Any]:
    ok = [r for r in records if r.error is None and r.end is not None]
    ttft = [r.first - r.start for r in ok if r.first is not None]
    gaps = [g for r in ok for g in r.gaps]
    achieved = [r.compression_rate for r in ok if r.compression_rate]
    return {
        "rate": rate,
        "requests": len(ok),
        "errors": len(records) - len(ok),
        "req_per_s": len(ok) / elapsed if elapsed > 0 else math.nan,
        "out_tok_per_s": sum(r.tokens for r in ok) / elapsed if elapsed > 0 else math.nan,
        "ttft_p50": percentile(ttft, 50),
        "ttft_p90": percentile(ttft, 90),
        "ttft_p99": percentile(ttft, 99),
        "itl_p50": percentile(gaps, 50),
        "itl_p90": percentile(gaps, 90),
        "itl_p99": percentile(gaps, 99),
        "kv_rate": sum(achieved) / len(achieved) if achieved else math.nan,
        "preemptions": stats.preemptions,
    }


def run_load_bench(cfg: LoadConfig, log=print) -> list[dict[str, Any]]:
    from kvcompress.bench.workload import text_prompts
    from kvcompress.compress import CompressionParams
    from kvcompress.engine import EngineConfig, LLMEngine
    from kvcompress.engine.async_engine import AsyncLLMEngine
    from kvcompress.entrypoints.openai.app import BackgroundServer, build_app, model_name

    rows = []
    for rate in cfg.rates:
        compression = CompressionParams(
            policy=cfg.policy,
            compression_rate=rate if rate > 1 else None,
            protected_window=cfg.protected_window,
        )
        engine = LLMEngine(
            EngineConfig(
                model=cfg.model,
                kv_cache_memory=cfg.kv_cache_memory,
                block_size=cfg.block_size,
                max_num_seqs=cfg.max_num_seqs,
                compression=compression,
            )
        )
        # Distinct prompts per client request; token ids so the length is exact.
        prompts = text_prompts(engine.tokenizer, max(4 * cfg.clients, 16), cfg.prompt_len)
        async_engine = AsyncLLMEngine(engine)
        with BackgroundServer(build_app(async_engine, model_name(cfg.model))) as server:
            log(f"rate {rate:g}: {cfg.clients} clients for {cfg.duration:g} s on {server.url}")
            records, elapsed = asyncio.run(drive(server.url, prompts, cfg))
            stats = async_engine.stats()
        rows.append(summarize(rate, records, elapsed, stats))
    return rows


# ---------------------------------------------------------------------- command line
def add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", type=int, default=8, help="concurrent streaming clients")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load per rate")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument(
        "--rates",
        type=parse_rates,
        default=(1, 8),
        help="server default rates (1: off)",
    )
    p.add_argument(
        "--kv-cache-memory",
        default="48MiB",
        help="KV budget; the default holds one uncompressed default request at a time",
    )
    p.add_argument("--model", default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--policy", default="kvcompress")
    p.add_argument("--protected-window", type=int, default=32)
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")


def run_load_command(args: argparse.Namespace) -> int:
    import logging
    import sys

    from kvcompress.bench.report import emit_report

    cfg = LoadConfig(
        clients=args.clients,
        duration=args.duration,
        prompt_len=args.prompt_len,
        max_tokens=args.max_tokens,
        rates=args.rates,
        kv_cache_memory=args.kv_cache_memory,
        model=args.model,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        policy=args.policy,
        protected_window=args.protected_window,
    )
    logging.basicConfig(level=logging.WARNING)
    rows = run_load_bench(cfg, log=lambda msg: print(msg, file=sys.stderr))
    header = (
        f"load benchmark: {cfg.clients} streaming clients x {cfg.duration:g} s per rate, "
        f"prompts of {cfg.prompt_len} tokens, {cfg.max_tokens} tokens out, "
        f"KV budget {cfg.kv_cache_memory}, policy {cfg.policy}; latencies in seconds"
    )
    emit_report(cfg, rows, args.json, header)
    return 0
