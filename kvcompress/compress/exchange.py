"""Chunk scores across tensor-parallel ranks: the global selection sees every head.

Under tensor parallelism each rank's cache holds only its own (layer, KV head) rows, but
KV-Compress chooses what a sequence evicts over all its heads at once. A rank scores its rows'
block-aligned chunks (one score per block: small), the exchange gathers the rows of every rank
into the order one device would hold them (layer-major, ``layer * num_kv_heads + head``), every
rank runs the same deterministic selection on that, and keeps its own rows of the result.

A KV head replicated on several ranks (more ranks than KV heads) counts once: its row is taken
from the first rank holding it. Each replica serves only some of the head's query heads, so a
score summed over the GQA group (the attention metric, the newest query's attention) is a
partial sum there; :meth:`merge_replicas` adds the replicas' scores up, as one device sums the
whole group.

:class:`LocalExchange` is the identity (one rank); :class:`AllGatherExchange` the collective.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.distributed as dist


class ChunkScoreExchange(Protocol):
    def global_rows(self, local_rows: int) -> int:
        """(layer, KV head) rows of the whole model."""
        ...

    def max(self, values: torch.Tensor) -> torch.Tensor:
        """Elementwise maximum over ranks."""
        ...

    def widest(self, width: int) -> int:
        """The largest of the ranks' ``width``."""
        ...

    def gather(self, rows: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
        """``[S, local rows, ...]`` -> ``[S, global rows, ...]`` in one device's row order;
        a trailing dimension that differs between ranks is padded with ``fill``."""
        ...

    def local(self, rows: torch.Tensor) -> torch.Tensor:
        """``[S, global rows, ...]`` -> this rank's ``[S, local rows, ...]``."""
        ...

    def merge_replicas(self, scores: torch.Tensor) -> torch.Tensor:
        """``[S, local rows, width]`` scores summed over the replicas of each row."""
        ...


class LocalExchange:
    """One rank holds every head: nothing to exchange."""

    def global_rows(self, local_rows: int) -> int:
        return local_rows

    def max(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def widest(self, width: int) -> int:
        return width

    def gather(self, rows: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
        return rows

    def local(self, rows: torch.Tensor) -> torch.Tensor:
        return rows

    def merge_replicas(self, scores: torch.Tensor) -> torch.Tensor:
        return scores


class AllGatherExchange:
    """Rows exchanged with ``torch.distributed`` collectives over ``group``.

    ``rows_of_rank[r]`` lists the global row index of each local row of rank ``r``; every
    rank holds the same number of rows. Every rank must make the same calls in the same
    order (the compressor's passes are sized from global figures for that reason).
    """

    def __init__(
        self,
        group: Any,
        rank: int,
        rows_of_rank: list[torch.Tensor],
        device: torch.device | str = "cpu",
    ) -> None:
        self.group = group
        self._device = torch.device(device)
        self.rank = rank
        self.size = len(rows_of_rank)
        flat = torch.cat(rows_of_rank)  # global row of each gathered row
        self.num_rows = int(flat.max()) + 1
        # The first gathered row holding each global row (replicas count once).
        first = torch.full((self.num_rows,), flat.numel(), dtype=torch.long)
        first.scatter_reduce_(0, flat, torch.arange(flat.numel()), "amin")
        self._pick = first
        self._flat = flat
        self._mine = rows_of_rank[rank]
        self.replicated = flat.numel() > self.num_rows
        self._on: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _index(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if device not in self._on:
            self._on[device] = tuple(t.to(device) for t in (self._pick, self._mine, self._flat))
        return self._on[device]

    def global_rows(self, local_rows: int) -> int:
        return self.num_rows

    def max(self, values: torch.Tensor) -> torch.Tensor:
        out = values.clone()
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.group)
        return out

    def widest(self, width: int) -> int:
        # On the group's device (NCCL needs CUDA tensors): where the rows live.
        return int(self.max(torch.tensor([width], device=self._device)))

    def _all_rows(self, rows: torch.Tensor, fill: float | int) -> torch.Tensor:
        """Every rank's rows side by side ``[S, size * local rows, ...]`` (padded)."""
        if rows.dim() > 2:
            pad = self.widest(rows.shape[-1]) - rows.shape[-1]
            if pad:
                rows = torch.nn.functional.pad(rows, (0, pad), value=fill)
        rows = rows.contiguous()
        parts = [torch.empty_like(rows) for _ in range(self.size)]
        dist.all_gather(parts, rows, group=self.group)
        return torch.cat(parts, dim=1)

    def gather(self, rows: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
        pick, _, _ = self._index(rows.device)
        return self._all_rows(rows, fill).index_select(1, pick)

    def local(self, rows: torch.Tensor) -> torch.Tensor:
        _, mine, _ = self._index(rows.device)
        return rows.index_select(1, mine)

    def merge_replicas(self, scores: torch.Tensor) -> torch.Tensor:
        if not self.replicated:
            return scores
        _, mine, flat = self._index(scores.device)
        every = self._all_rows(scores, float("inf"))
        S, _, width = every.shape
        total = torch.zeros(S, self.num_rows, width, dtype=scores.dtype, device=scores.device)
        total.index_add_(1, flat, every)
        return total.index_select(1, mine)[..., : scores.shape[-1]]
