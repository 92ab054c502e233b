"""Admission, compression triggers and preemption under a fixed KV memory budget.

Order of remedies when memory runs short: compress (sequences whose parameters allow it,
down to their budgets), then preempt the most recently admitted sequence, which is
recomputed later from its tokens. A request is never dropped.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

import torch

from kvcompress.cache import PagedKVCache
from kvcompress.compress import Compressor
from kvcompress.engine.config import EngineConfig
from kvcompress.engine.sequence import Sequence, SequenceStatus


class Batch(NamedTuple):
    seqs: list[Sequence]
    is_prefill: bool
    # Sequences that can no longer grow even alone in the cache: the engine ends them with
    # finish reason "length" rather than loop on preempting them.
    exhausted: list[Sequence]


class Scheduler:
    def __init__(self, config: EngineConfig, cache: PagedKVCache, compressor: Compressor) -> None:
        self.config = config
        self.cache = cache
        self.compressor = compressor
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.compression_passes = 0
        self.compression_seconds = 0.0
        self.preemptions = 0

    @property
    def heads(self) -> int:
        return self.cache.num_layers * self.cache.num_kv_heads

    def prompt_blocks(self, num_tokens: int) -> int:
        return self.heads * -(-num_tokens // self.cache.block_size)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ schedule
    def schedule(self) -> Batch | None:
        exhausted: list[Sequence] = []
        admitted = self._admit(exhausted)
        if admitted:
            return Batch(admitted, True, exhausted)
        if self.running:
            self._make_room_for_decode(exhausted)
        if not self.running and not exhausted:
            return None
        return Batch(list(self.running), False, exhausted)

    def _admit(self, exhausted: list[Sequence]) -> list[Sequence]:
        admitted: list[Sequence] = []
        tokens = 0
        free = self.cache.num_free_blocks
        while self.waiting:
            seq = self.waiting[0]
            need = self.prompt_blocks(seq.num_tokens)
            if need > self.cache.num_blocks:  # a preempted sequence that outgrew the cache
                exhausted.append(self.waiting.popleft())
                continue
            fits = need <= free and len(self.running) + len(admitted) < self.config.max_num_seqs
            # allocate_seq below already takes each admitted sequence's slot.
            fits &= self.cache.num_free_seq_slots > 0
            fits &= not admitted or tokens + seq.num_tokens <= self.config.max_num_batched_tokens
            if not fits:
                break
            self.waiting.popleft()
            seq.slot = self.cache.allocate_seq()
            seq.status = SequenceStatus.RUNNING
            admitted.append(seq)
            tokens += seq.num_tokens
            free -= need
        self.running.extend(admitted)
        return admitted

    def _decode_need(self) -> int:
        slots = torch.tensor([s.slot for s in self.running], dtype=torch.long)
        return self.cache.blocks_needed(slots, torch.ones(len(self.running), dtype=torch.long))

    def _make_room_for_decode(self, exhausted: list[Sequence]) -> None:
        if self._decode_need() <= self.cache.num_free_blocks:
            return
        self.compress([s for s in self.running if s.may_compress])
        while self.running and self._decode_need() > self.cache.num_free_blocks:
            if len(self.running) == 1:
                exhausted.append(self.running.pop())
            else:
                self._preempt(self.running[-1])

    def _preempt(self, seq: Sequence) -> None:
        """Free a sequence's blocks; it is recomputed from its tokens when admitted again."""
        self.running.remove(seq)
        self.cache.free_seq(seq.slot)
        seq.slot = None
        seq.status = SequenceStatus.WAITING
        seq.preemptions += 1
        seq.compressions = 0
        seq.steps_since_compression = 0
        self.preemptions += 1
        self.waiting.appendleft(seq)

    # ------------------------------------------------------------------ compression
    def compress(self, seqs: list[Sequence]) -> None:
        seqs = [s for s in seqs if s.may_compress and s.slot is not None]
        if not seqs:
            return
        stats = self.compressor.compress([s.slot for s in seqs], [s.compression for s in seqs])
        self.compression_passes += 1
        self.compression_seconds += stats.seconds
        for seq in seqs:
            seq.compressions += 1
            seq.steps_since_compression = 0

    def after_step(self, batch: Batch) -> None:
        """Compression triggers: right after prefill, and every ``compression_interval``."""
        if batch.is_prefill:
            self.compress([s for s in batch.seqs if not s.finished])
            return
        due = []
        for seq in batch.seqs:
            if seq.finished:
                continue
            seq.steps_since_compression += 1
            interval = seq.compression.compression_interval
            if interval is not None and seq.steps_since_compression >= interval:
                due.append(seq)
        self.compress(due)

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.slot is not None:
            self.cache.free_seq(seq.slot)
            seq.slot = None
        seq.status = SequenceStatus.FINISHED
