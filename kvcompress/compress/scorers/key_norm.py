"""``key-norm``: query-agnostic; keys with a LARGE L2 norm are evicted first.

Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"
(arXiv 2406.11430), find that a low key norm goes with HIGH attention during decoding, and
keep the low-norm keys (kvpress's KnormPress scores ``-||k||``). So the score is ``-||k||``:
the highest norms are the lowest scores. It needs no query at all, which makes it the natural
scorer for compressing a document before its question arrives (``suffix``).

Norms are not on one scale across layers and heads (some layers' keys are several times
longer than others'), so the global selection would hand one layer's budget to another by
scale alone: raw, it answered none of four pass-key prompts that per-head budgets answered.
Each head's scores are therefore standardised (``(s - mean) / std`` over the KVs it holds):
a KV's score says how unusually short its key is within its own head, and the global
selection gives more budget to heads with more such keys (measurements in
``docs/quality.md``).
"""

from __future__ import annotations

import torch

from kvcompress.compress.scorers.base import ScoreContext
from kvcompress.compress.scorers.keys import gather_keys
from kvcompress.compress.scorers.standardize import standardize_per_head


def held_key_norms(ctx: ScoreContext) -> torch.Tensor:
    """``[S, LH, width]``: ``||k||_2`` of every held KV (an fp8 cache's scaled back).

    When this pass's blocks are at least half the pool, the norms of the whole pool are taken
    in place and one float per KV is gathered: copying 64 floats per KV first cost about four
    times as much (and most of that was the fresh buffer's page faults). Otherwise the keys
    are gathered, so that a small pass never reads a large pool; an fp8 pool too, whose
    float32 copy would be four times its size."""
    cache, view = ctx.cache, ctx.view
    if cache.quantized or 2 * view.blocks.numel() < cache.k_pool.shape[0]:
        return torch.linalg.vector_norm(gather_keys(ctx), dim=-1)
    return view.gather(torch.linalg.vector_norm(cache.k_pool, dim=-1, dtype=torch.float32))


class KeyNormScorer:
    name = "key-norm"
    uses_metric = False
    pooled = False
    requires: tuple[str, ...] = ()
    query_agnostic = True
    per_query_head = False

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        return standardize_per_head(-held_key_norms(ctx), ctx.view.valid())
