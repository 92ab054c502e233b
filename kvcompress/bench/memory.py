"""``kvcompress bench memory``: physical memory freed vs KVs evicted, and compression speed.

Fills a cache with sequences shaped like a real model, gives each (layer, head) a metric
distribution of its own (some heads concentrate attention, some spread it), compresses at
each rate, and reports KVs seen, kept and physically held.

The time is one ``Compressor.compress`` call: scoring (the request's scorer, ``window`` by
default: the stored metric; ``--scorer`` picks another), planning and compaction. The
``last-query`` scorer reads each sequence's newest query and ``expected-attention`` its
expected query to come, which the bench draws at random (``num_q_heads`` query heads per
layer, as the engine would hand them).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from kvcompress.cache import CacheConfig, PagedKVCache, kv_dtype_from_name
from kvcompress.compress import SCORERS, CompressionParams, Compressor, ScorerInputs, exact_rates


@dataclass(frozen=True)
class MemoryBenchConfig:
    prompt_len: int = 2048
    num_seqs: int = 8
    block_size: int = 16
    rates: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64)
    num_layers: int = 30
    num_kv_heads: int = 3
    # Query heads per layer (the default model's 9), for the queries the query scorers read.
    num_q_heads: int = 9
    head_dim: int = 64
    # Storage of K and V, as --kv-cache-dtype names it ("auto": float32, the bench's model).
    kv_cache_dtype: str = "float32"
    repeats: int = 3
    seed: int = 0
    # What every rate uses besides it.
    compression: CompressionParams = field(default_factory=exact_rates)

    def __post_init__(self) -> None:
        names = ("prompt_len", "num_seqs", "repeats", "num_layers", "num_kv_heads", "head_dim")
        for name in (*names, "num_q_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(
                f"num_q_heads ({self.num_q_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        kv_dtype_from_name(self.kv_cache_dtype, torch.float32)  # a ValueError naming the choices
        if not self.rates or any(r < 1 for r in self.rates):
            raise ValueError(f"rates must be numbers >= 1, got {self.rates}")


def _skewed_metrics(n_heads: int, n_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """``[n_heads, n_tokens]``: per-head scale spread over four orders of magnitude, and
    heavy-tailed per-token attention within each head."""
    scale = 10.0 ** (4 * torch.rand(n_heads, 1, generator=generator))
    tail = torch.rand(n_heads, n_tokens, generator=generator).clamp_min(1e-6) ** -1.5
    return scale * tail


def _fill(cache: PagedKVCache, cfg: MemoryBenchConfig, generator: torch.Generator) -> list[int]:
    slots = [cache.allocate_seq() for _ in range(cfg.num_seqs)]
    plan = cache.prepare_append(torch.tensor(slots), torch.full((cfg.num_seqs,), cfg.prompt_len))
    n = plan.slots.shape[-1]
    kv = torch.randn(n, cfg.num_kv_heads, cfg.head_dim, generator=generator)
    for layer in range(cfg.num_layers):
        cache.write(layer, plan.slots[layer], kv, kv)
    heads = cfg.num_layers * cfg.num_kv_heads
    metric = _skewed_metrics(heads, n, generator)
    cache.metric.view(-1)[plan.slots.reshape(-1)] = metric.reshape(-1)
    return slots


def _scorer_inputs(cfg: MemoryBenchConfig, generator: torch.Generator) -> ScorerInputs:
    """What the engine would hand the compressor for the configured scorer: random queries
    (the newest ones, or each window's mean) of the engine's shape."""
    shape = (cfg.num_seqs, cfg.num_layers, cfg.num_q_heads, cfg.head_dim)
    return ScorerInputs(
        **{
            name: torch.randn(shape, generator=generator)
            for name in SCORERS[cfg.compression.effective_scorer].requires
        }
    )


def run_memory_bench(cfg: MemoryBenchConfig) -> list[dict]:
    kvs_per_seq = cfg.prompt_len * cfg.num_layers * cfg.num_kv_heads
    blocks_per_head = -(-cfg.prompt_len // cfg.block_size)
    num_blocks = cfg.num_seqs * cfg.num_layers * cfg.num_kv_heads * blocks_per_head
    cache_cfg = CacheConfig(
        num_layers=cfg.num_layers,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        block_size=cfg.block_size,
        kv_cache_memory=num_blocks * cfg.block_size * (2 * cfg.head_dim * 4 + 8),
        max_seqs=cfg.num_seqs,
        max_model_len=cfg.prompt_len,
        dtype=kv_dtype_from_name(cfg.kv_cache_dtype, torch.float32),
    )
    cache = PagedKVCache(cache_cfg)
    compressor = Compressor(cache, seed=cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    inputs = _scorer_inputs(cfg, generator)

    def one_run(rate: float) -> tuple[float, int, int]:
        slots = _fill(cache, cfg, generator)
        params = cfg.compression.with_overrides(compression_rate=float(rate))
        start = time.perf_counter()
        compressor.compress(slots, [params] * len(slots), inputs)
        seconds = time.perf_counter() - start
        kept = int(cache.context_lens[:, slots].sum())
        physical = cache.pool.num_used * cfg.block_size
        for slot in slots:
            cache.free_seq(slot)
        return seconds, kept, physical

    one_run(max(cfg.rates))  # warm-up: first-touch page faults are not the method's cost
    rows = []
    seen = kvs_per_seq * cfg.num_seqs
    for rate in cfg.rates:
        runs = [one_run(rate) for _ in range(cfg.repeats)]
        seconds = statistics.median(r[0] for r in runs)
        _, kept, physical = runs[-1]
        rows.append(
            {
                "rate": rate,
                "kvs_seen": seen,
                "kvs_kept": kept,
                "physical_kvs": physical,
                "achieved_rate": seen / kept,
                "physical_over_theoretical": physical / kept,
                "ms_per_million_kvs": seconds * 1e3 / (seen / 1e6),
            }
        )
    return rows
