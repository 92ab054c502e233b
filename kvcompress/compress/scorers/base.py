"""The one interface every scorer implements, and what a scorer is given.

A scorer answers one question for the planner: how valuable is each held KV? It returns
``[S, LH, width]`` scores in block-table order (the layout of :class:`~kvcompress.cache.HeadView`),
low evicted first. The compressor then marks protected, sink and padding slots ``+inf`` and
the block-aligned planner is the same for every scorer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch

from kvcompress.cache import HeadView, PagedKVCache
from kvcompress.compress.exchange import ChunkScoreExchange
from kvcompress.compress.scorers.attention import Pooling
from kvcompress.compress.workspace import Workspace

if TYPE_CHECKING:
    from kvcompress.compress.params import CompressionParams


class ScorerInputs(NamedTuple):
    """Per-sequence facts the engine knows and the cache does not (all optional).

    Rows follow the ``seq_slots`` given to :meth:`Compressor.compress`.

    - ``prefill_lens [S]``: tokens the sequence held when its last prefill ended (the end of
      the metric's observation window; a preempted sequence's recompute counts). ``None``:
      the current length, exact for the compression right after a prefill.
    - ``last_queries [S, L, Hq, D]``: post-RoPE query of each sequence's newest token, for
      the ``last-query`` scorer.
    - ``query_mean``, ``query_var [S, L, Hq, D]``: mean and variance of the queries to come,
      post-RoPE, for ``expected-attention`` (the engine gives the mean of each sequence's
      latest prefill window, carried to the positions after it, and no variance).
    - ``spans [S, P]`` long: the span start of each position (a word or a number, cut from
      the tokens), for the scorers whose attention is pooled (``pooled``) in sequences that
      pool over spans (``pool_spans``); ``P`` covers every position held.
    """

    prefill_lens: torch.Tensor | None = None
    last_queries: torch.Tensor | None = None
    query_mean: torch.Tensor | None = None
    query_var: torch.Tensor | None = None
    spans: torch.Tensor | None = None

    def select(self, rows: list[int]) -> ScorerInputs:
        """The rows of some sequences (a compression pass)."""
        return ScorerInputs(*(None if t is None else t[rows] for t in self))


class ScoreContext(NamedTuple):
    """Everything a scorer may read for one compression pass of ``S`` sequences."""

    cache: PagedKVCache
    view: HeadView
    seq_slots: torch.Tensor  # [S] long
    positions: torch.Tensor  # [S, LH, width] int32: original token position of each slot
    seq_lens: torch.Tensor  # [S] long: tokens seen
    params: list[CompressionParams]  # one per sequence, all with the same scorer
    inputs: ScorerInputs  # already restricted to this pass's sequences
    window_size: torch.Tensor  # [S] long: the prefill metric's observation window
    collection_buffer: torch.Tensor  # [S] long: query-key distance below which nothing counts
    pool_kernel: torch.Tensor  # [S] long: max-pool width along positions (odd, 1: none)
    pool_spans: torch.Tensor  # [S] bool: then the max over each span (``inputs.spans``)
    workspace: Workspace
    generator: torch.Generator
    # The tensor-parallel ranks' view of the whole model (the identity on one device).
    exchange: ChunkScoreExchange

    @property
    def scale(self) -> float:
        """Attention logit scale (1/sqrt(head_dim), as in every supported model)."""
        return self.cache.head_dim**-0.5

    @property
    def pooling(self) -> Pooling:
        """Each sequence's max-pooling of attention scores along positions."""
        return Pooling(self.positions, self.pool_kernel, self.pool_spans, self.inputs.spans)


class Scorer(Protocol):
    """One way to score KVs. Stateless; registered by name in :data:`SCORERS`."""

    name: str
    # The engine must accumulate the attention metric for this scorer (prefill window plus
    # decode steps); the others leave it alone and let decode take the fused path.
    uses_metric: bool
    # ScorerInputs fields without which this scorer cannot run.
    requires: tuple[str, ...]
    # Scores without the attention of any query of the prompt (``expected-attention`` reads
    # only their statistics): the choice for compressing a context before its question
    # arrives (``suffix`` / ``--compress-context-only``).
    query_agnostic: bool
    # Attention computed at compression, max-pooled along positions as the window metric
    # is when collected (``ScoreContext.pooling``): with ``pool_spans`` it reads
    # ``ScorerInputs.spans``.
    pooled: bool
    # Scores sum over each KV head's GQA group of query heads: a tensor-parallel replica of
    # the KV head holds only some of them, and the compressor adds the replicas' scores up
    # (a scorer whose scores are not such a sum merges them itself, ``ctx.exchange``).
    per_query_head: bool

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        """``[S, LH, width]`` float32, low evicted first (padding may hold anything)."""
        ...
