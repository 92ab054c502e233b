"""``position``: recency only (StreamingLLM's rule): the oldest KVs go first."""

from __future__ import annotations

import torch

from kvcompress.compress.scorers.base import ScoreContext


class PositionScorer:
    name = "position"
    uses_metric = False
    pooled = False
    requires: tuple[str, ...] = ()
    query_agnostic = True
    per_query_head = False

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        return ctx.positions.float()
