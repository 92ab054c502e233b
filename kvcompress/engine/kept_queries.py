"""What the engine keeps of the queries for the scorers that read them, per sequence slot.

Two stores, each allocated on first use: the newest token's query (``last-query``,
:mod:`~kvcompress.engine.last_queries`) and the latest observation window's mean
query (``expected-attention``, :mod:`~kvcompress.engine.window_queries`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from kvcompress.compress import ScorerInputs
from kvcompress.engine.last_queries import LastQueries
from kvcompress.engine.window_queries import WindowQueries


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

    def copy(self, source: int, dest: int) -> None:
        """A fork starts from what its parent kept."""
        self.newest.copy(source, dest)
        self.windows.copy(source, dest)
