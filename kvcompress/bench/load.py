"""``kvcompress bench load``: the HTTP server under concurrent streaming clients.

For each compression rate a server runs (started by the caller, on a loopback port) with that
rate as its default; N asyncio clients stream completions of long prompts back to back for
T seconds. Compression lets more sequences share the same KV memory, which shows up as
throughput and latency at a fixed budget. Everything is bounded: clients stop starting
requests at the deadline and requests still open a grace period later are cancelled.

With ``oversized`` set, one more client sends that many requests whose prompts are far too
long for the model (``oversized_chars`` characters) while the load runs, spread over the
duration. The server must reject them without pausing everyone else, so the row reports the
inter-token gaps of the streams that overlapped such a request beside those that did not.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, NamedTuple


@dataclass
class LoadConfig:
    clients: int = 8
    duration: float = 30.0  # seconds of new requests per rate
    prompt_len: int = 512  # tokens
    max_tokens: int = 64
    rates: tuple[float, ...] = (1, 8)  # 1: compression off
    grace: float = 60.0  # after the deadline, open requests get this long to finish
    oversized: int = 0  # requests with far too long prompts sent during each rate's run
    oversized_chars: int = 5_000_000  # characters in each of their prompts

    def __post_init__(self) -> None:
        if self.clients < 1 or self.duration <= 0 or self.prompt_len < 1 or self.max_tokens < 1:
            raise ValueError("clients, duration, prompt_len and max_tokens must be positive")
        if self.oversized < 0 or self.oversized_chars < 1:
            raise ValueError("oversized must be >= 0 and oversized_chars >= 1")
        if not self.rates or any(r < 1 for r in self.rates):
            raise ValueError(f"rates must be numbers >= 1, got {self.rates}")


@dataclass
class RequestRecord:
    start: float
    first: float | None = None
    end: float | None = None
    tokens: int = 0
    gaps: list[float] = field(default_factory=list)  # between consecutive streamed chunks
    gap_ends: list[float] = field(default_factory=list)  # when each gap ended
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
                    rec.gap_ends.append(now)
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


class Probe(NamedTuple):
    """One oversized request: when it was sent, when its answer came, the HTTP status."""

    start: float
    end: float
    status: int


async def _oversized(client, url: str, start: float, cfg: LoadConfig) -> list[Probe]:
    """``cfg.oversized`` requests with prompts far beyond any context, spread evenly over the
    run so that each one meets streams in full flight."""
    prompt = ("word " * (cfg.oversized_chars // 5 + 1))[: cfg.oversized_chars]
    body = json.dumps({"prompt": prompt, "max_tokens": 1}).encode()
    probes = []
    for k in range(cfg.oversized):
        await asyncio.sleep(
            max(0.0, start + (k + 1) * cfg.duration / (cfg.oversized + 1) - time.perf_counter())
        )
        sent = time.perf_counter()
        try:
            resp = await client.post(
                f"{url}/v1/completions", content=body, headers={"content-type": "application/json"}
            )
            status = resp.status_code
        except Exception:  # a dropped connection is a result too
            status = 0
        probes.append(Probe(sent, time.perf_counter(), status))
    return probes


class LoadRun(NamedTuple):
    records: list[RequestRecord]
    elapsed: float  # seconds from the first request to the last answer
    probes: list[Probe]  # the oversized requests (none unless ``cfg.oversized``)


async def drive(url: str, prompts: list[list[int]], cfg: LoadConfig) -> LoadRun:
    """Run the clients (and the oversized requests) against ``url``."""
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
        probing = asyncio.create_task(_oversized(client, url, start, cfg))
        done, pending = await asyncio.wait([*tasks, probing], timeout=cfg.duration + cfg.grace)
        for task in pending:  # bounded: requests still open after the grace period are cut
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    records = [r for t in tasks if t in done for r in t.result()]
    ends = [r.end for r in records if r.end is not None]
    elapsed = (max(ends) if ends else time.perf_counter()) - start
    return LoadRun(records, elapsed, probing.result() if probing in done else [])


def split_gaps(
    records: list[RequestRecord], probes: list[Probe]
) -> tuple[list[float], list[float]]:
    """Inter-token gaps that overlapped an oversized request in flight, and the others."""
    during: list[float] = []
    quiet: list[float] = []
    for rec in records:
        for gap, end in zip(rec.gaps, rec.gap_ends, strict=True):
            overlaps = any(p.start < end and end - gap < p.end for p in probes)
            (during if overlaps else quiet).append(gap)
    return during, quiet


def summarize(
    rate: float,
    records: list[RequestRecord],
    elapsed: float,
    stats,
    probes: list[Probe] | None = None,
) -> dict[str, Any]:
    """One row; with ``probes`` (the oversized requests) also the inter-token p90 of the gaps
    that overlapped one of them and of those that did not."""
    ok = [r for r in records if r.error is None and r.end is not None]
    ttft = [r.first - r.start for r in ok if r.first is not None]
    gaps = [g for r in ok for g in r.gaps]
    achieved = [r.compression_rate for r in ok if r.compression_rate]
    row = {
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
    if probes is not None:
        during, quiet = split_gaps(ok, probes)
        statuses = sorted({p.status for p in probes})
        row |= {
            "oversized": len(probes),
            "oversized_status": "/".join(str(s) for s in statuses) or "-",
            "oversized_s_max": max((p.end - p.start for p in probes), default=math.nan),
            "itl_p90_during": percentile(during, 90),
            "itl_p90_quiet": percentile(quiet, 90),
            "itl_max_during": max(during, default=math.nan),
        }
    return row


class ServerRun(NamedTuple):
    """A server started for one rate: its URL and a way to read its engine's statistics."""

    url: str
    stats: Callable[[], Any]
    prompts: list[list[int]]


def run_load_bench(
    cfg: LoadConfig,
    serve: Callable[[float], AbstractContextManager[ServerRun]],
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """For each rate, ``serve(rate)`` starts a server with that rate as its default and
    the clients run against it; one row per rate."""
    rows = []
    for rate in cfg.rates:
        with serve(rate) as server:
            log(f"rate {rate:g}: {cfg.clients} clients for {cfg.duration:g} s on {server.url}")
            run = asyncio.run(drive(server.url, server.prompts, cfg))
            stats = server.stats()
        probes = run.probes if cfg.oversized else None
        rows.append(summarize(rate, run.records, run.elapsed, stats, probes))
    return rows
