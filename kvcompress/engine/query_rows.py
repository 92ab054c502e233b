"""One row of queries per cache sequence slot and layer, allocated on first use."""

from __future__ import annotations

import torch


class QueryRows:
    """``[max_seqs, L, Hq, D]`` float32 (the precision the scorers compute in), allocated by
    the first step that keeps something: an engine whose requests never ask holds nothing."""

    def __init__(
        self,
        max_seqs: int,
        num_layers: int,
        num_q_heads: int,
        head_dim: int,
        device: torch.device,
    ) -> None:
        self.shape = (max_seqs, num_layers, num_q_heads, head_dim)
        self.device = device
        self.store: torch.Tensor | None = None

    def allocated(self) -> torch.Tensor:
        if self.store is None:
            # A normal tensor even though the step runs in inference mode, as the cache's
            # pools are: the scheduler copies rows into forks outside it.
            with torch.inference_mode(False):
                self.store = torch.zeros(self.shape, dtype=torch.float32, device=self.device)
        return self.store

    def get(self, slots: list[int]) -> torch.Tensor | None:
        """``[S, L, Hq, D]``: these sequences' rows (None before any was kept)."""
        if self.store is None:
            return None
        return self.store[torch.tensor(slots, dtype=torch.long, device=self.device)]

    def row(self, slot: int) -> torch.Tensor | None:
        """A copy of one slot's row (None before any was kept): kept by a swapped-out
        sequence until it returns."""
        return None if self.store is None else self.store[slot].clone()

    def put(self, slot: int, row: torch.Tensor | None) -> None:
        """Write back a row taken by :meth:`row`."""
        if row is not None:
            self.allocated()[slot] = row

    def copy(self, source: int, dest: int) -> None:
        """A fork starts from its parent's row."""
        if self.store is not None:
            self.store[dest] = self.store[source]
