"""What the engine keeps of the queries for the scorers that read them, per sequence slot.

Two stores, each allocated on first use: the newest token's query (``last-query``,
:mod:`~kvcompress.engine.last_queries`) and the expected query to come, from the latest
observation window (``expected-attention``, :mod:`~kvcompress.engine.window_queries`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch

from kvcompress.compress import ScorerInputs
from kvcompress.engine.last_queries import LastQueries
from kvcompress.engine.window_queries import WindowQueries


class KeptRows(NamedTuple):
    """One sequence's rows of both stores, off their slot (a swapped-out sequence's)."""

    newest: torch.Tensor | None
    window: torch.Tensor | None


class KeptQueries(NamedTuple):
    newest: LastQueries
    windows: WindowQueries

    def inputs(self, slots: list[int], needs: Iterable[str]) -> ScorerInputs | None:
        """The ``ScorerInputs`` of these sequences for the fields their scorers need (rows
        of sequences whose scorer reads none are never read); None when none is needed."""
        needs = set(needs)
        fields = {}
        if "last_queries" in needs:
            fields["last_queries"] = self.newest.get(slots)
        if "query_mean" in needs:
            fields["query_mean"] = self.windows.get(slots)
        return ScorerInputs(**fields) if any(v is not None for v in fields.values()) else None

    def rows(self, slot: int) -> KeptRows:
        return KeptRows(self.newest.row(slot), self.windows.row(slot))

    def put(self, slot: int, rows: KeptRows) -> None:
        self.newest.put(slot, rows.newest)
        self.windows.put(slot, rows.window)

    def copy(self, source: int, dest: int) -> None:
        """A fork starts from what its parent kept."""
        self.newest.copy(source, dest)
        self.windows.copy(source, dest)
