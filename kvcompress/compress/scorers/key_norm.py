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


def key_norm_scores(keys: torch.Tensor) -> torch.Tensor:
    """``[..., D] -> [...]``: ``-||k||_2`` (low is evicted first)."""
    return -torch.linalg.vector_norm(keys.float(), dim=-1)


def standardize_per_head(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[S, LH, W]``: each head's scores minus their mean over its held KVs, over their
    standard deviation (a head whose scores are all equal gets 0s; padding is left as is)."""
    weight = valid.float()
    count = weight.sum(dim=-1, keepdim=True).clamp(min=1)
    mean = (scores * weight).sum(dim=-1, keepdim=True) / count
    centred = scores - mean
    std = ((centred * centred * weight).sum(dim=-1, keepdim=True) / count).sqrt()
    return centred / std.clamp(min=torch.finfo(torch.float32).tiny)


class KeyNormScorer:
    name = "key-norm"
    uses_metric = False
    requires: tuple[str, ...] = ()
    query_agnostic = True
    per_query_head = False

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        return standardize_per_head(key_norm_scores(gather_keys(ctx)), ctx.view.valid())
