"""``key-norm``: query-agnostic; keys with a LARGE L2 norm are evicted first.

Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"
(arXiv 2406.11430), find that a low key norm goes with HIGH attention during decoding, and
keep the low-norm keys (kvpress's KnormPress scores ``-||k||``). So the score is ``-||k||``:
the highest norms are the lowest scores. It needs no query at all, which makes it the natural
scorer for compressing a document before its question arrives (``suffix``).
"""

from __future__ import annotations

import torch

from kvcompress.compress.scorers.base import ScoreContext
from kvcompress.compress.scorers.keys import gather_keys


def key_norm_scores(keys: torch.Tensor) -> torch.Tensor:
    """``[..., D] -> [...]``: ``-||k||_2`` (low is evicted first)."""
    return -torch.linalg.vector_norm(keys.float(), dim=-1)


class KeyNormScorer:
    name = "key-norm"
    uses_metric = False
    requires: tuple[str, ...] = ()
    query_agnostic = True

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        return key_norm_scores(gather_keys(ctx))
