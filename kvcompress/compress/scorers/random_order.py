"""``random``: a control; every KV equally likely to go (seeded by the compressor)."""

from __future__ import annotations

import torch

from kvcompress.compress.scorers.base import ScoreContext


class RandomScorer:
    name = "random"
    uses_metric = False
    requires: tuple[str, ...] = ()
    query_agnostic = True

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        shape = ctx.positions.shape
        return torch.rand(shape, generator=ctx.generator, device=ctx.positions.device)
