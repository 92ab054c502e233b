"""Prometheus metrics: engine state read at scrape time, latencies observed per request.

Each app gets its own registry, so several servers in one process (tests, the load
benchmark) never collide on metric names.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvcompress.engine import AsyncLLMEngine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FINISH_REASONS = ("stop", "length", "abort", "error")
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class EngineCollector(Collector):
    """Reads the engine's latest statistics snapshot on every scrape."""

    def __init__(self, engine: AsyncLLMEngine, model: str) -> None:
        self.engine = engine
        self.model = model

    def collect(self) -> Iterator[Metric]:
        s = self.engine.stats()
        labels = ["model"]
        values = [self.model]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(f"kvcompress_{name}", doc, labels=labels)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(f"kvcompress_{name}", doc, labels=labels)
            c.add_metric(values, value)
            return c

        yield gauge("requests_running", "Requests running in the engine", s.running)
        yield gauge("requests_waiting", "Requests waiting for KV memory", s.waiting)
        yield gauge("kv_blocks_total", "KV blocks in the pool", s.blocks_total)
        yield gauge("kv_blocks_free", "KV blocks free", s.blocks_free)
        yield gauge("kv_blocks_used", "KV blocks handed out by the pool", s.blocks_used)
        yield gauge(
            "kv_blocks_held",
            "KV blocks referenced by running requests' block tables",
            s.blocks_held,
        )
        yield gauge(
            "kv_blocks_shared",
            "Block-table references to KV blocks that several sequences share (n > 1 forks)",
            s.blocks_shared,
        )
        yield gauge(
            "kv_blocks_leaked",
            "KV blocks handed out by the pool but referenced by no running request",
            s.blocks_leaked,
        )
        yield gauge("kv_block_size", "KVs per block", s.block_size)
        yield gauge("kvs_kept", "KVs kept by running requests", s.kvs_kept)
        yield gauge("kvs_seen", "KVs written by running requests", s.kvs_seen)
        yield counter("compression_passes", "Compression passes run", s.compression_passes)
        yield counter(
            "compression_seconds", "Seconds spent in compression passes", s.compression_seconds
        )
        yield counter("preemptions", "Requests preempted for lack of KV memory", s.preemptions)
        yield counter("swaps", "Preemptions that swapped the request out to host memory", s.swaps)
        yield gauge("swapped_bytes", "Host bytes held by swapped-out requests", s.swapped_bytes)
        yield counter("prompt_tokens", "Prompt tokens processed", s.prompt_tokens)
        yield counter("generation_tokens", "Tokens generated", s.generation_tokens)
        prompt_tps, generation_tps = self.engine.throughput()
        window = f"over the last {self.engine.throughput_window:g} s"
        yield gauge("prompt_tokens_per_second", f"Prompt tokens per second {window}", prompt_tps)
        yield gauge(
            "generation_tokens_per_second", f"Generated tokens per second {window}", generation_tps
        )
        counts = self.engine.finished_counts()
        finished = CounterMetricFamily(
            "kvcompress_requests", "Requests ended, by finish reason", labels=[*labels, "reason"]
        )
        for reason in sorted(set(FINISH_REASONS) | set(counts)):
            finished.add_metric([*values, reason], counts.get(reason, 0))
        yield finished
        yield counter("engine_step_errors", "Engine steps that raised", self.engine.step_errors)


class ServerMetrics:
    """The registry of one app: engine collector plus per-request latency histograms."""

    def __init__(self, engine: AsyncLLMEngine, model: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine, model))
        self.time_to_first_token = Histogram(
            "kvcompress_time_to_first_token_seconds",
            "From request arrival to its first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "kvcompress_inter_token_latency_seconds",
            "Mean time between generated tokens, per request",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "kvcompress_request_latency_seconds",
            "From request arrival to its last token",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rejected = Counter(
            "kvcompress_requests_rejected",
            "Requests answered with an error before generating, by HTTP status",
            ["status"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
