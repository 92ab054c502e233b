"""``last-query`` (TOVA): keep what the newest token's query attends to.

TOVA (Oren et al., "Transformers are Multi-State RNNs", arXiv 2401.06104) evicts by the
attention of the most recent query alone. The cache stores keys but no queries, and no key-only
proxy of a query is faithful, so this scorer takes the query from the engine
(``ScorerInputs.last_queries``, post-RoPE, ``[S, L, Hq, D]``) and recomputes that query's
attention over every held KV at compression time: exact, and independent of how the metric
was collected. Without it the compressor refuses the request (``InvalidParameterError``).
"""

from __future__ import annotations

import torch

from kvcompress.compress.scorers.attention import Pooling, group_attention
from kvcompress.compress.scorers.base import ScoreContext
from kvcompress.compress.scorers.keys import gather_keys, query_rows


def last_query_attention(
    queries: torch.Tensor,  # [S, L, Hq, D] post-RoPE query of each sequence's newest token
    keys: torch.Tensor,  # [S, L * Hkv, W, D] held keys in block-table order
    valid: torch.Tensor,  # [S, L * Hkv, W] bool
    scale: float,
    pooling: Pooling | None = None,
) -> torch.Tensor:
    """``[S, L * Hkv, W]``: that query's attention probability on each KV, max-pooled along
    positions if ``pooling`` says so, summed over the query heads of each KV head's GQA
    group (0 on padding)."""
    q = query_rows(queries, keys.shape[1] // queries.shape[1])  # [S, LH, G, D]
    logits = torch.matmul(q * scale, keys.float().transpose(-1, -2))  # [S, LH, G, W]
    return group_attention(logits, valid, pooling)


class LastQueryScorer:
    name = "last-query"
    uses_metric = False
    pooled = True
    requires: tuple[str, ...] = ("last_queries",)
    query_agnostic = False
    per_query_head = True

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        queries = ctx.inputs.last_queries
        assert queries is not None, "the compressor checks `requires` first"
        return last_query_attention(
            queries, gather_keys(ctx), ctx.view.valid(), ctx.scale, ctx.pooling
        )
