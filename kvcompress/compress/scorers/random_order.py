"""``random``: a control; every KV equally likely to go (seeded by the compressor)."""

from __future__ import annotations

import torch

from kvcompress.compress.scorers.base import ScoreContext


class RandomScorer:
    name = "random"
    uses_metric = False
    pooled = False
    requires: tuple[str, ...] = ()
    query_agnostic = True
    per_query_head = False

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        S, rows, width = ctx.positions.shape
        exchange = ctx.exchange
        # Drawn for every head of the model, as one device draws them, and this rank's rows
        # kept: tensor-parallel ranks then evict exactly what one device would.
        shape = (S, exchange.global_rows(rows), exchange.widest(width))
        every = torch.rand(shape, generator=ctx.generator, device=ctx.positions.device)
        return exchange.local(every)[..., :width]
