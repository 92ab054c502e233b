"""CUDA graphs of decode steps: the model's forward of a decode-only batch, captured once per
batch-size bucket and replayed.

A decode step of a small model on a GPU is bound by its launches (30 layers of a dozen kernels
each) and by the Python that issues them, not by the device. Replaying a captured graph issues
the whole forward at once. What a graph replays is fixed at capture, so a step's inputs go
through static buffers: the token ids, positions, cache rows, the slots its K and V are written
to, and how each sequence collects the metric. A batch is padded up to its bucket with copies of
its last sequence, which recompute that sequence's very K and V into the same slots and collect
no metric (power 0), so padding changes nothing the cache holds.

Nothing in a captured step depends on how many KVs a head holds: the Triton kernels read each
head's length from the block tables' lengths on the device, and their split-K plan covers the
longest head a sequence may hold. Each bucket has two graphs, with and without the metric
kernel. Compression, prefill and steps that keep queries (``last-query``) run eagerly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

from kvcompress.attention.metadata import captured_decode_metadata
from kvcompress.cache import AppendPlan, PagedKVCache

logger = logging.getLogger(__name__)

# Batch sizes a graph is captured for (those up to the engine's max_num_seqs, and that).
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The captured batch sizes for an engine running up to ``max_batch`` sequences."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    return (*(b for b in BUCKETS if b < max_batch), max_batch)


class _Step(NamedTuple):
    graph: torch.cuda.CUDAGraph | None  # None: replayed by calling ``forward`` (CPU tests)
    forward: Callable[[], torch.Tensor]
    # [bucket, hidden]: the graph's output buffer. The LM head runs outside the graph, on
    # the batch's own rows: logits buffers of every bucket would hold bucket x vocab floats.
    hidden: torch.Tensor


class DecodeGraphs:
    """Captured decode steps for one model and cache (one rank)."""

    def __init__(
        self,
        model: torch.nn.Module,
        cache: PagedKVCache,
        max_batch: int,
        *,
        use_graphs: bool = True,
    ) -> None:
        self.model = model
        self.cache = cache
        # False: the static-buffer steps run eagerly (the same code path, no capture): for
        # testing without a GPU.
        self.use_graphs = use_graphs
        self.buckets = batch_buckets(max_batch)
        dev = cache.config.device
        n, L, H = self.buckets[-1], cache.num_layers, cache.num_kv_heads
        long = dict(dtype=torch.long, device=dev)
        # Before the first step the buffers address slot 0 of block 0 and cache row 0, so the
        # warm-up forwards write where no sequence lives yet: captured before any request.
        self.input_ids = torch.zeros(n, **long)
        self.positions = torch.zeros(n, **long)
        self.seq_slots = torch.zeros(n, **long)
        self.write_slots = torch.zeros(L, n, H, **long)
        self.metric_power = torch.zeros(n, **long)
        self.collection_buffer = torch.zeros(n, **long)
        self._rows = torch.arange(n, **long)
        self._steps: dict[tuple[int, bool], _Step] = {}
        self._pool = None

    def bucket(self, batch: int) -> int | None:
        """The smallest captured size holding ``batch`` sequences (None: too many)."""
        for size in self.buckets:
            if size >= batch:
                return size
        return None

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up (Triton compiles each kernel variant) and capture every bucket, largest
        first, so that the smaller ones reuse its memory pool."""
        start = time.perf_counter()
        if self.use_graphs:
            self._pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.buckets):
            for collects in (False, True):
                self._steps[size, collects] = self._capture(size, collects)
        # The warm-up wrote K and V of no real sequence: an fp8 cache takes its scales from
        # the first prefill instead.
        self.cache.reset_scales()
        logger.info(
            "captured %d decode graphs (batch sizes %s) in %.1f s",
            len(self._steps),
            ",".join(map(str, self.buckets)),
            time.perf_counter() - start,
        )

    def _capture(self, size: int, collects: bool) -> _Step:
        L, H = self.cache.num_layers, self.cache.num_kv_heads
        meta = captured_decode_metadata(
            self.cache,
            seq_slots=self.seq_slots[:size],
            write_slots=self.write_slots[:, :size].reshape(L, size * H),
            positions=self.positions[:size],
            metric_power=self.metric_power[:size],
            collection_buffer=self.collection_buffer[:size],
            collects=collects,
        )
        ids, positions, model = self.input_ids[:size], self.positions[:size], self.model

        def forward() -> torch.Tensor:
            return model(ids, positions, meta)

        if not self.use_graphs:
            return _Step(None, forward, forward())
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compiles the kernels, settles the allocator
                forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            hidden = forward()
        return _Step(graph, forward, hidden)

    def run(
        self,
        per_seq: torch.Tensor,  # [>= 4, B] long: cache rows, tokens fed, metric power, buffer
        input_ids: torch.Tensor,  # [B]
        plan: AppendPlan,  # the step's append (prepare_append done)
        collects: bool,
    ) -> torch.Tensor:
        """The logits ``[B, vocab]`` of a decode step of ``B`` sequences (``B`` at most the
        largest bucket)."""
        B = input_ids.shape[0]
        size = self.bucket(B)
        if size is None:
            raise ValueError(f"a captured step holds at most {self.buckets[-1]} sequences")
        # Padding rows repeat the last sequence: the same K and V into the same slots.
        src = self._rows[:size].clamp(max=B - 1)
        self.seq_slots[:size] = per_seq[0, src]
        self.input_ids[:size] = input_ids[src]
        self.positions[:size] = plan.positions[src]
        self.write_slots[:, :size] = plan.slots.transpose(1, 2)[:, src]
        self.metric_power[:size] = per_seq[2, src]
        self.metric_power[B:size] = 0  # a padding row adds nothing to the metric
        self.collection_buffer[:size] = per_seq[3, src]
        step = self._steps[size, collects]
        if step.graph is None:
            hidden = step.forward()
        else:
            step.graph.replay()
            hidden = step.hidden
        # A new tensor: the next replay overwrites the graph's output buffer.
        return self.model.compute_logits(hidden[:B])
