"""Scorers: what varies between eviction methods while the block-aligned planner stays.

Every scorer implements :class:`Scorer` (``scores(ctx) -> [S, LH, width]``, low evicted
first) and is registered here by name; ``CompressionParams.scorer`` picks one per request.

=====================  =========================================================  ==========
name                   score                                                      query-free
=====================  =========================================================  ==========
``window``             accumulated attention metric (observation window + decode)  no
``position``           token position (recency)                                    yes
``random``             uniform random (a control)                                  yes
``key-norm``           ``-||k||`` standardised per head: large norms go first       yes
``expected-attention`` expected attention of the queries to come, pooled, log,     yes
                       standardised per head
``last-query``         attention of the newest token's query (TOVA), pooled        no
=====================  =========================================================  ==========

The global selection of the ``kvcompress`` policy compares scores across heads, so each
scorer's should be on one scale there: attention probabilities of real queries (max-pooled
along positions with the request's ``pool_kernel``, as the window metric is), or scores
standardised per head (key norms; the log of one expected query's attention, which as
probabilities lost the pass key under the global selection: ``docs/quality.md``).

"query-free" scorers never attend with the prompt's queries (``expected-attention`` reads only
statistics of the context's last ones), so they suit compressing a context
before its question is fed (``LLMEngine.add_request(..., suffix=question)``).
"""

from kvcompress.compress.scorers.base import ScoreContext, Scorer, ScorerInputs
from kvcompress.compress.scorers.expected_attention import (
    ExpectedAttentionScorer,
    expected_attention,
)
from kvcompress.compress.scorers.key_norm import KeyNormScorer
from kvcompress.compress.scorers.last_query import LastQueryScorer, last_query_attention
from kvcompress.compress.scorers.position import PositionScorer
from kvcompress.compress.scorers.random_order import RandomScorer
from kvcompress.compress.scorers.window import WindowScorer, queries_seen

SCORERS: dict[str, Scorer] = {
    s.name: s
    for s in (
        WindowScorer(),
        PositionScorer(),
        RandomScorer(),
        KeyNormScorer(),
        ExpectedAttentionScorer(),
        LastQueryScorer(),
    )
}

__all__ = [
    "SCORERS",
    "ScoreContext",
    "Scorer",
    "ScorerInputs",
    "expected_attention",
    "last_query_attention",
    "queries_seen",
]
