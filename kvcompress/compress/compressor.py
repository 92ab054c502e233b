"""Compress many sequences of a paged cache in batched passes.

The pipeline per pass: gather every head's slots -> score (the request's scorer, see
:mod:`kvcompress.compress.scorers`) -> sort -> choose chunks (policy) -> compaction. Sequences
are grouped by allocation policy and scorer (at most a handful of groups), and a pass holds at
most ``max_kvs_per_pass`` KVs, since sorting costs memory proportional to it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import NamedTuple

import torch

from kvcompress.cache import HeadView, OutOfBlocksError, PagedKVCache
from kvcompress.compress import budget
from kvcompress.compress.compaction import compact
from kvcompress.compress.exchange import ChunkScoreExchange, LocalExchange
from kvcompress.compress.metrics import MetricConfig
from kvcompress.compress.params import CompressionParams
from kvcompress.compress.planner import (
    chunk_scores,
    plan_from_chunks,
    select_global,
    select_global_with_layer_floor,
    select_per_head,
    sort_scores,
)
from kvcompress.compress.scorers import SCORERS, ScoreContext, ScorerInputs
from kvcompress.compress.workspace import Workspace
from kvcompress.errors import InvalidParameterError


class CompressionStats(NamedTuple):
    sequences: int
    kvs_evicted: int
    blocks_freed: int
    seconds: float


class Compressor:
    def __init__(
        self,
        cache: PagedKVCache,
        max_kvs_per_pass: int = 1 << 24,
        seed: int = 0,
        metric_config: MetricConfig | None = None,
        exchange: ChunkScoreExchange | None = None,
    ) -> None:
        """``exchange``: how chunk scores reach the other tensor-parallel ranks, whose caches
        hold the sequence's other heads (see :mod:`kvcompress.compress.exchange`); every rank
        then makes the same calls, and together they evict what one device would."""
        if max_kvs_per_pass < 1:
            raise ValueError(f"max_kvs_per_pass must be >= 1, got {max_kvs_per_pass}")
        self.cache = cache
        # How the metric was collected (window, buffer) unless a request says otherwise:
        # the "avg" divisor depends on it.
        self.metric_config = metric_config or MetricConfig()
        self.max_kvs_per_pass = max_kvs_per_pass
        self.exchange = exchange or LocalExchange()
        self._generator = torch.Generator(device=cache.config.device).manual_seed(seed)
        self.workspace = Workspace(cache.config.device)

    @torch.inference_mode()
    def compress(
        self,
        seq_slots: Sequence[int],
        params: Sequence[CompressionParams],
        inputs: ScorerInputs | None = None,
    ) -> CompressionStats:
        """Evict down to each sequence's budget; sequences already within it are untouched.

        ``inputs`` carries what some scorers need from the engine, one row per sequence
        (see :class:`ScorerInputs`); a scorer whose input is missing is refused before any
        change (``InvalidParameterError`` naming ``scorer``).
        """
        if len(seq_slots) != len(params):
            raise ValueError("one CompressionParams per sequence slot")
        inputs = inputs or ScorerInputs()
        for p in params:
            missing = [
                name
                for name in SCORERS[p.effective_scorer].requires
                if getattr(inputs, name) is None
            ]
            if p.evicts and missing:
                raise InvalidParameterError(
                    f"scorer {p.effective_scorer!r} needs {', '.join(missing)}, which this "
                    "caller does not provide",
                    param="scorer",
                )
            if inputs.spans is None and p.pools_spans_at_compression(self.metric_config):
                raise InvalidParameterError(
                    f"pool_spans with scorer {p.effective_scorer!r} needs the token spans "
                    "(ScorerInputs.spans), which this caller does not provide",
                    param="pool_spans",
                )
        # A sequence twice in one call would be compacted twice from the same view: its blocks
        # are freed twice (the pool silently corrupts) and its lengths go wrong.
        seen: set[int] = set()
        for slot in seq_slots:
            if int(slot) in seen:
                raise ValueError(f"sequence slot {int(slot)} appears more than once in compress")
            seen.add(int(slot))
        start = time.perf_counter()
        groups: dict[tuple[str, str], list[int]] = {}
        for i, p in enumerate(params):
            if p.evicts:
                groups.setdefault((p.policy, p.effective_scorer), []).append(i)
        kvs = blocks = 0
        for members in groups.values():
            for batch in self._passes([seq_slots[i] for i in members]):
                rows = [members[i] for i in batch]
                try:
                    e, b = self._compress_pass(
                        [seq_slots[i] for i in rows],
                        [params[i] for i in rows],
                        inputs.select(rows),
                    )
                except OutOfBlocksError:
                    # Forked sequences share blocks that this pass would have to copy, and
                    # the pool cannot hold the copies: the pass is skipped, nothing changed.
                    continue
                kvs += e
                blocks += b
        n = sum(len(m) for m in groups.values())
        return CompressionStats(n, kvs, blocks, time.perf_counter() - start)

    def _passes(self, slots: list[int]) -> list[list[int]]:
        """Split sequences (as indices into ``slots``) so each pass sorts at most
        ``max_kvs_per_pass`` KVs; a single sequence larger than that gets a pass of its own."""
        # Global figures: every rank must split the same passes (their collectives pair up).
        lens = self.exchange.max(self.cache.context_lens[:, slots, :].amax(dim=(0, 2))).tolist()
        rows = self.exchange.global_rows(self.cache.num_layers * self.cache.num_kv_heads)
        passes: list[list[int]] = []
        current: list[int] = []
        longest = 0
        for i, n in enumerate(lens):
            widest = max(longest, n)
            if current and widest * rows * (len(current) + 1) > self.max_kvs_per_pass:
                passes.append(current)
                current, widest = [], n
            current.append(i)
            longest = widest
        if current:
            passes.append(current)
        return passes

    def _compress_pass(
        self, slots: list[int], params: list[CompressionParams], inputs: ScorerInputs
    ) -> tuple[int, int]:
        cache = self.cache
        dev = cache.config.device
        seq_slots = torch.tensor(slots, dtype=torch.long, device=dev)
        view = cache.head_view(seq_slots)
        exchange = self.exchange
        if exchange.widest(view.width) == 0:
            return 0, 0
        scores = self.scores(seq_slots, view, params, inputs)
        if SCORERS[params[0].effective_scorer].per_query_head:
            scores = exchange.merge_replicas(scores)
        sorted_scores = sort_scores(
            scores, self.workspace.get("sorted", scores.shape, torch.float32)
        )
        chunks = chunk_scores(sorted_scores, view.lens, cache.block_size)
        # The selection sees every head of the model, in one device's order.
        lens = exchange.gather(view.lens)
        chunks = exchange.gather(chunks, fill=float("inf"))

        seq_lens = cache.seq_lens[seq_slots]
        protected = budget.protected_count(
            seq_lens, self._col(params, "protected_window", dev), self._col(params, "sinks", dev)
        )
        target = budget.target_kept_per_head(
            seq_lens.double(),
            protected.double(),
            self._col(params, "compression_rate", dev, torch.float64),
            self._col(params, "max_cache_tokens", dev, torch.float64),
            self._col(params, "min_cache_tokens", dev, torch.float64),
        )
        LH = lens.shape[1]
        allowed = budget.allowed_blocks(target, LH, cache.block_size)
        allocation = params[0].policy_spec.allocation
        if allocation == "global":
            held = torch.div(lens + cache.block_size - 1, cache.block_size, rounding_mode="floor")
            if any(p.layer_floor > 0 for p in params):
                floor = self._col(params, "layer_floor", dev, torch.float64)
                freed = select_global_with_layer_floor(
                    chunks, held, allowed, cache.num_layers, floor
                )
            else:
                freed = select_global(chunks, (held.sum(dim=1) - allowed).clamp(min=0))
        else:
            if allocation == "pyramid":
                kv_heads = LH // cache.num_layers
                per_head = budget.spread_pyramid(allowed, cache.num_layers, kv_heads)
            else:
                per_head = budget.spread_evenly(allowed, LH)
            freed = select_per_head(chunks, lens, per_head, cache.block_size)
        freed = exchange.local(freed)
        plan = plan_from_chunks(scores, sorted_scores, view.lens, freed, cache.block_size)
        blocks = compact(cache, seq_slots, view, plan, self.workspace)
        return int(plan.evict_counts.sum().item()), blocks

    def scores(
        self,
        seq_slots: torch.Tensor,
        view: HeadView,
        params: list[CompressionParams],
        inputs: ScorerInputs | None = None,
    ) -> torch.Tensor:
        """Eviction scores ``[S, LH, width]`` of sequences sharing one scorer: low is evicted
        first, ``+inf`` never (protected window, sinks, padding)."""
        cache = self.cache
        rows = view.blocks.numel()
        positions = view.gather(
            cache.position, self.workspace.get("positions", (rows, cache.block_size), torch.int32)
        )
        seq_lens = cache.seq_lens[seq_slots]
        dev = positions.device
        ctx = ScoreContext(
            cache=cache,
            view=view,
            seq_slots=seq_slots,
            positions=positions,
            seq_lens=seq_lens,
            params=params,
            inputs=inputs or ScorerInputs(),
            window_size=self._metric_setting(params, "window_size", dev),
            collection_buffer=self._metric_setting(params, "collection_buffer", dev),
            pool_kernel=self._metric_setting(params, "pool_kernel", dev),
            pool_spans=self._metric_setting(params, "pool_spans", dev).bool(),
            workspace=self.workspace,
            generator=self._generator,
            exchange=self.exchange,
        )
        scores = SCORERS[params[0].effective_scorer].scores(ctx)
        col = (-1, 1, 1)
        window = self._col(params, "protected_window", dev).view(col)
        sinks = self._col(params, "sinks", dev).view(col)
        keep = (positions >= seq_lens.view(col) - window) | (positions < sinks) | ~view.valid()
        return scores.masked_fill_(keep, float("inf"))

    def _metric_setting(
        self, params: list[CompressionParams], name: str, device: torch.device
    ) -> torch.Tensor:
        """``[S]`` long: a metric-collection setting of each request (its own, else the
        engine-wide :class:`MetricConfig`'s)."""
        values = [getattr(p.metric_settings(self.metric_config), name) for p in params]
        return torch.tensor(values, dtype=torch.long, device=device)

    @staticmethod
    def _col(
        params: list[CompressionParams], name: str, device: torch.device, dtype=torch.long
    ) -> torch.Tensor:
        values = [getattr(p, name) for p in params]
        values = [math.nan if v is None else v for v in values]
        return torch.tensor(values, dtype=dtype, device=device)
