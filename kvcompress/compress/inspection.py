"""What each (layer, KV head) of one sequence holds: the data behind ``kvcompress inspect``.

:func:`kept_kvs` reads a sequence's rows of a :class:`~kvcompress.cache.PagedKVCache` (after
a compression, typically) into a :class:`KeptKVs`: the original positions each head kept,
their metric values and the heads' budgets. Its helpers answer "did head (l, h) keep token
t, and how did its metric rank there?" for a span of tokens, all heads at once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kvcompress.cache import PagedKVCache


class KeptKVs(NamedTuple):
    """One sequence's held KVs per (layer, KV head), sorted by position within each head."""

    positions: torch.Tensor  # [L, H, width] long, ascending; -1 past each head's count
    metric: torch.Tensor  # [L, H, width] float32 accumulated metric; nan past the count
    kept: torch.Tensor  # [L, H] long: KVs held (the per-head budgets the planner chose)
    seq_len: int  # tokens the sequence has seen

    def holds(self, span: torch.Tensor) -> torch.Tensor:
        """``[L, H, n]`` bool: whether each head still holds each position of ``span [n]``."""
        return (self.positions.unsqueeze(-1) == span.view(1, 1, 1, -1)).any(dim=2)

    def metric_ranks(self) -> torch.Tensor:
        """``[L, H, width]`` long: each held KV's rank by metric within its head (0: the
        highest), -1 on padding. Ties keep position order."""
        filled = torch.nan_to_num(self.metric, nan=float("-inf"))
        order = torch.argsort(filled, dim=-1, descending=True, stable=True)
        rank = torch.arange(order.shape[-1], device=order.device).expand_as(order)
        ranks = torch.empty_like(order).scatter_(-1, order, rank.contiguous())
        return ranks.masked_fill(self.positions < 0, -1)

    def span_ranks(self, span: torch.Tensor) -> torch.Tensor:
        """``[L, H, n]`` long: the metric rank of each position of ``span`` in each head,
        -1 where the head evicted it."""
        match = self.positions.unsqueeze(-1) == span.view(1, 1, 1, -1)  # [L, H, width, n]
        ranks = self.metric_ranks().unsqueeze(-1).expand_as(match)
        return torch.where(match, ranks, -1).amax(dim=2)


def kept_kvs(cache: PagedKVCache, slot: int) -> KeptKVs:
    """The KVs every (layer, KV head) of sequence ``slot`` holds now (a copy, on the CPU)."""
    view = cache.head_view(torch.tensor([slot], device=cache.config.device))
    L, H = cache.num_layers, cache.num_kv_heads
    valid = view.valid()[0]  # [LH, width]
    positions = view.gather(cache.position)[0].long().masked_fill(~valid, -1)
    metric = view.gather(cache.metric)[0].masked_fill(~valid, float("nan"))
    # Held slots in position order; padding (-1 -> a large key) after them.
    key = positions.masked_fill(~valid, torch.iinfo(torch.long).max)
    order = torch.argsort(key, dim=-1, stable=True)
    positions = positions.gather(-1, order)
    metric = metric.gather(-1, order)
    width = positions.shape[-1]
    return KeptKVs(
        positions.view(L, H, width).cpu(),
        metric.view(L, H, width).cpu(),
        view.lens[0].view(L, H).cpu(),
        int(cache.seq_lens[slot]),
    )
