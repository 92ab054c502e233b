"""What the engine reports: per-request outputs and KV statistics, engine-wide figures."""

from __future__ import annotations

from typing import NamedTuple

import torch

from kvcompress.cache import PagedKVCache
from kvcompress.compress import CompressionParams
from kvcompress.compress.budget import blocks_after_compression
from kvcompress.engine.logprobs import TokenLogprob


class KVStats(NamedTuple):
    """One request's KV cache at the end of its last step.

    ``physical_kvs`` and ``blocks`` are counted from the request's block tables (what it
    really holds), ``kvs_kept`` from its heads' lengths: a gap between them is held memory
    that stores nothing.
    """

    kvs_seen: int  # tokens x layers x KV heads written
    kvs_kept: int
    physical_kvs: int  # blocks x block_size
    blocks: int
    block_size: int
    compression_rate: float  # kvs_seen / kvs_kept
    physical_over_theoretical: float
    kept_per_layer_head: list[list[int]]
    compressions: int
    # Of ``blocks``, those shared with other sequences of the same request (forks, n > 1):
    # ``blocks`` counts each shared block once per sequence referencing it, so the
    # request's sequences together hold fewer physical blocks than their sum.
    blocks_shared: int = 0

    def as_dict(self) -> dict:
        return self._asdict()

    @classmethod
    def of(cls, cache: PagedKVCache, slot: int, compressions: int) -> KVStats:
        kept_grid = cache.kept_per_layer_head(slot)
        kept = int(kept_grid.sum())
        seen = int(cache.seq_lens[slot]) * cache.num_layers * cache.num_kv_heads
        physical = cache.physical_kvs(slot)  # from the block tables: a leak shows here
        return cls(
            kvs_seen=seen,
            kvs_kept=kept,
            physical_kvs=physical,
            blocks=cache.blocks_held(slot),
            block_size=cache.block_size,
            compression_rate=seen / kept if kept else 1.0,
            physical_over_theoretical=physical / kept if kept else 1.0,
            kept_per_layer_head=kept_grid.tolist(),
            compressions=compressions,
            blocks_shared=cache.blocks_shared(slot),
        )


class RequestOutput(NamedTuple):
    """One request after a step.

    ``new_token_ids`` holds only the tokens this step generated (a step does not copy a
    request's whole output); ``token_ids`` holds every generated token, on the final output
    only (empty before). ``text`` is everything generated so far.

    With ``n > 1`` (or ``best_of``) a request has several choices: each output belongs to
    the choice ``index``; ``finish_reason`` is set on a choice's last output (with its
    ``token_ids`` and ``kv``), and ``finished`` only on the request's very last output, once
    every choice is done. With ``best_of > n`` only final outputs come, ranked by
    ``cumulative_logprob``.

    ``logprobs`` (requests that asked for them) holds one entry per new token.
    ``prompt_logprobs`` and the ``prompt_token_ids`` they score come once, on the output of
    the step that completes the prefill; the first prompt token has no logprob (None).
    """

    request_id: str
    text: str
    new_token_ids: list[int]
    num_output_tokens: int
    prompt_tokens: int
    finished: bool
    finish_reason: str | None
    kv: KVStats | None
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_token_ids: list[int] | None = None
    index: int = 0
    cumulative_logprob: float | None = None


class RequestState(NamedTuple):
    """A request in flight, as :meth:`LLMEngine.requests_in_flight` lists it."""

    request_id: str
    status: str  # "waiting" | "running"
    prompt_tokens: int
    output_tokens: int


class RankBlocks(NamedTuple):
    """One tensor-parallel rank's KV blocks: the budget (``kv_cache_memory``) is per rank."""

    rank: int
    blocks_total: int
    blocks_free: int
    blocks_held: int
    blocks_peak: int
    blocks_shared: int
    blocks_distinct: int
    kvs_kept: int  # by the sequences asked about

    @classmethod
    def of(cls, cache: PagedKVCache, slots: list[int], rank: int = 0) -> RankBlocks:
        rows = cache.block_tables[:, slots]
        refs = rows[rows >= 0]
        held = int(refs.numel())
        # References to blocks that other references share (forks of n > 1 requests).
        multi = cache.pool.refcount[refs] > 1
        shared = int(multi.sum()) if held else 0
        return cls(
            rank=rank,
            blocks_total=cache.num_blocks,
            blocks_free=cache.num_free_blocks,
            blocks_held=held,
            blocks_peak=cache.pool.peak_used,
            blocks_shared=shared,
            blocks_distinct=held - shared + (int(refs[multi].unique().numel()) if shared else 0),
            kvs_kept=int(cache.context_lens[:, slots].sum()) if slots else 0,
        )


class EngineStats(NamedTuple):
    running: int
    waiting: int
    blocks_total: int
    blocks_free: int  # from the pool
    blocks_held: int  # referenced by the block tables of requests in flight
    # The most blocks in use at once since start (or the last reset_peak_memory): the
    # real high-water mark, reached between a chunk's append and its compression.
    blocks_peak: int
    block_size: int
    kvs_kept: int  # KVs held by running sequences
    kvs_seen: int  # KVs written by running sequences
    compression_passes: int
    compression_seconds: float
    preemptions: int
    prompt_tokens: int  # processed since start
    generation_tokens: int  # generated since start
    prefill_seconds: float  # model time of steps that fed prompt chunks, since start
    decode_seconds: float  # model time of decode-only steps since start
    # Of ``blocks_held``, the table references to blocks referenced more than once (forks of
    # an n > 1 request share their prompt): ``blocks_used`` (physical) <= ``blocks_held``.
    blocks_shared: int = 0
    # Distinct blocks the tables reference (``blocks_held`` counts a shared block once per
    # table): the pool's used blocks minus these are leaked.
    blocks_distinct: int = 0
    # Under tensor parallelism, each rank's blocks; the block and KV counts above are their
    # sums (``blocks_peak``: the sum of each rank's high-water mark). Empty on one device.
    ranks: tuple[RankBlocks, ...] = ()
    # Of ``preemptions``, those that swapped the sequence out to host memory (the others
    # recompute it), and the host bytes swapped-out sequences hold now.
    swaps: int = 0
    swapped_bytes: int = 0

    @property
    def blocks_used(self) -> int:
        return self.blocks_total - self.blocks_free

    @property
    def blocks_leaked(self) -> int:
        return self.blocks_used - self.blocks_distinct


class Capacity(NamedTuple):
    """The KV cache's size, and what a request needs of it."""

    num_blocks: int
    free_blocks: int
    block_size: int
    bytes_per_kv: int  # K, V, metric and position of one KV
    heads: int  # layers x KV heads: KVs written per token
    max_num_seqs: int
    max_model_len: int

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_kv * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks ``num_tokens`` tokens hold uncompressed (every head of every layer)."""
        return self.heads * -(-num_tokens // self.block_size)

    def blocks_compressed(self, params: CompressionParams, num_tokens: int) -> int:
        """Blocks a sequence of ``num_tokens`` tokens holds once compressed by ``params``
        (all of them when the parameters evict nothing)."""
        return blocks_after_compression(params, num_tokens, self.heads, self.block_size)


class TeacherForceResult(NamedTuple):
    """What :meth:`LLMEngine.teacher_force` returns."""

    logits: torch.Tensor  # [len(continuation), vocab] float32
    kv: KVStats  # the cache after the last continuation token
