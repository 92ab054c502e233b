"""One rank of the engine: its shard of the model, its KV cache, and the commands it runs.

Every rank (rank 0 included, where the scheduler lives) holds a :class:`Rank`: the model
shard with its KV heads, one :class:`PagedKVCache` for those heads (``kv_cache_memory`` is
per rank), an attention backend, a compressor that exchanges chunk scores with the other
ranks, and a model runner. On one rank, :func:`build_rank` is simply how the engine builds
these. With several, rank 0 broadcasts each command (see :mod:`.distributed`) and every rank
runs the same :class:`RankWorker` method in lockstep: the collectives inside (the model's
all-reduces, the compressor's all-gathers) pair up because every rank makes the same calls.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from kvcompress.attention import make_backend
from kvcompress.cache import CacheConfig, PagedKVCache
from kvcompress.cache.paged_cache import CacheAudit
from kvcompress.compress import AllGatherExchange, CompressionParams, Compressor, ScorerInputs
from kvcompress.engine.config import EngineConfig
from kvcompress.engine.cuda_graphs import DecodeGraphs
from kvcompress.engine.model_runner import ModelRunner
from kvcompress.engine.outputs import KVStats, RankBlocks
from kvcompress.engine.token_spans import TokenSpans
from kvcompress.models import LoadedModel, load_model, pack_linear_weights
from kvcompress.models.parallel import ShardLayout, TensorParallel

logger = logging.getLogger(__name__)


class Rank(NamedTuple):
    loaded: LoadedModel
    cache: PagedKVCache
    backend: Any  # an AttentionBackend
    compressor: Compressor
    runner: ModelRunner
    max_model_len: int


def build_rank(
    config: EngineConfig, device: torch.device, tp: TensorParallel | None = None
) -> Rank:
    """This process's model (shard), cache, backend, compressor and runner."""
    loaded = load_model(config.model, dtype=config.dtype, device=device, tp=tp)
    if config.packs_weights:
        pack_linear_weights(loaded.model)
    mc = loaded.config
    max_model_len = min(
        config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings
    )
    layout = loaded.model.shard.layout
    cache_config = CacheConfig(
        num_layers=mc.num_layers,
        num_kv_heads=len(layout.kv_heads),
        head_dim=mc.head_dim,
        kv_cache_memory=config.kv_cache_memory,
        block_size=config.block_size,
        dtype=config.kv_cache_dtype,
        device=device,
        max_seqs=config.max_num_seqs,
        max_model_len=max_model_len,
    )
    cache = PagedKVCache(cache_config)
    backend = make_backend(config.attention_backend, cache)
    loaded.model.set_attention_backend(backend)
    exchange = None
    if tp is not None and tp.size > 1:
        rows = [
            ShardLayout.of(mc, r, tp.size).global_rows(mc.num_layers, mc.num_kv_heads)
            for r in range(tp.size)
        ]
        exchange = AllGatherExchange(tp.group, tp.rank, rows, device)
    compressor = Compressor(
        cache,
        config.max_kvs_per_pass,
        seed=config.seed,
        metric_config=config.metric,
        exchange=exchange,
    )
    runner = ModelRunner(
        loaded.model, cache, device, config.metric, TokenSpans.from_tokenizer(loaded.tokenizer)
    )
    if config.uses_cuda_graphs:
        runner.graphs = DecodeGraphs(loaded.model, cache, config.max_num_seqs)
        runner.graphs.capture()
    return Rank(loaded, cache, backend, compressor, runner, max_model_len)


@dataclass
class PlannedSeq:
    """What a rank needs of one scheduled sequence to run its step (the runner reads these
    attributes of a :class:`~kvcompress.engine.sequence.Sequence`): its slot, the tokens it
    feeds, what it collects (the metric, its newest query, its window's mean query)."""

    slot: int
    num_computed: int
    # The sequence's tokens from position ``tokens_from`` up to the last it feeds this step:
    # the last token of a decode or a chunk's tokens, and before a chunk whose metric is
    # pooled over spans every earlier token too (``tokens_from`` 0), whose spans it reads.
    tokens: list[int]
    tokens_from: int
    compression: CompressionParams
    collects_metric: bool
    keeps_last_query: bool
    keeps_window_queries: bool

    @property
    def last_token(self) -> int:
        return self.tokens[-1]

    def token_slice(self, start: int, end: int) -> list[int]:
        if start < self.tokens_from:
            raise ValueError(f"tokens from {start} were not sent, only from {self.tokens_from}")
        return self.tokens[start - self.tokens_from : end - self.tokens_from]


class RankWorker:
    """The commands every rank runs together; ``group`` carries the small control-plane
    reductions (gloo, also beside NCCL)."""

    def __init__(self, rank: Rank, tp: TensorParallel, group: Any) -> None:
        self.rank = rank
        self.tp = tp
        self.group = group

    # ------------------------------------------------------------- sequence slots
    def replay(self, ops: list[tuple]) -> None:
        """Apply the driver's slot operations since the last command, in order; the slot
        stacks of all ranks stay identical, so every allocation yields the driver's slot."""
        cache = self.rank.cache
        for op, *args in ops:
            if op == "allocate_seq":
                slot = cache.allocate_seq()
            elif op == "fork_seq":
                slot = cache.fork_seq(args[0])
                # A fork starts from the queries its parent kept (unread unless it needs them).
                self.rank.runner.kept_queries.copy(args[0], slot)
            else:
                cache.free_seq(args[0])
                continue
            if slot != args[-1]:
                raise RuntimeError(f"rank {self.tp.rank}: slot {slot}, rank 0 has {args[-1]}")

    # ------------------------------------------------------------- steps
    def execute(self, plan: list[PlannedSeq], num_tokens: list[int], num_decode: int) -> None:
        # No logits: the LM head is replicated and only rank 0 samples.
        self.rank.runner.run(plan, num_tokens, num_decode, [])

    def compress(
        self, slots: list[int], params: list[CompressionParams], spans: torch.Tensor | None
    ) -> Any:
        # Scorers that read the queries read this rank's: its query heads.
        needs = {f for p in params for f in p.scorer_requires}
        inputs = self.rank.runner.kept_queries.inputs(slots, needs)
        if spans is not None:
            spans = spans.to(self.rank.cache.config.device)
            inputs = (inputs or ScorerInputs())._replace(spans=spans)
        return self.rank.compressor.compress(slots, params, inputs)

    # ------------------------------------------------------------- block accounting
    def _reduce(self, value: int, op: Any) -> int:
        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=op, group=self.group)
        return int(t)

    def free_blocks(self) -> int:
        """Free blocks of the fullest rank's pool."""
        return self._reduce(self.rank.cache.num_free_blocks, dist.ReduceOp.MIN)

    def blocks_needed(self, slots: torch.Tensor, num_tokens: torch.Tensor) -> int:
        """Blocks the neediest rank must allocate to append ``num_tokens``."""
        return self._reduce(self.rank.cache.blocks_needed(slots, num_tokens), dist.ReduceOp.MAX)

    def reports(self, slots: list[int]) -> list[RankBlocks]:
        return self.all_gather(RankBlocks.of(self.rank.cache, slots, self.tp.rank))

    def kv_stats(self, slot: int, compressions: int) -> list[KVStats]:
        return self.all_gather(KVStats.of(self.rank.cache, slot, compressions))

    def audit(self) -> list[CacheAudit]:
        """Every rank's pool checked against its block tables."""
        return self.all_gather(self.rank.cache.audit())

    def reset_peak(self) -> None:
        self.rank.cache.pool.reset_peak()

    def all_gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.tp.size
        dist.all_gather_object(out, obj, group=self.group)
        return out


def serve(worker: RankWorker) -> None:
    """A rank's loop: run rank 0's commands until it says ``shutdown`` (or the group breaks,
    which raises: the process exits, and rank 0's next collective reports it)."""
    while True:
        message: list[Any] = [None]
        dist.broadcast_object_list(message, src=0, group=worker.group)
        ops, name, args = message[0]
        worker.replay(ops)
        if name == "shutdown":
            return
        getattr(worker, name)(*args)
