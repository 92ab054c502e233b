"""The newest token's query of each sequence whose scorer reads it (``last-query``, TOVA).

The cache stores keys, not queries, so the attention backend keeps, during each step, the
post-RoPE query of such a sequence's newest token in every layer (``QueryCapture``), one row
per cache sequence slot; after the step the compressor reads it (``ScorerInputs.last_queries``).
A step without such a sequence copies nothing. A fork starts from its parent's row (their
newest token is the same).
"""

from __future__ import annotations

import torch

from kvcompress.attention.metadata import QueryCapture
from kvcompress.engine.query_rows import QueryRows


class LastQueries(QueryRows):
    def capture(self, rows: list[int], slots: list[int]) -> QueryCapture | None:
        """What the step's backend keeps: flat token ``rows[i]`` of the step is the newest
        token of the sequence in cache slot ``slots[i]``. None when there is nothing to keep."""
        if not rows:
            return None
        store = self.allocated()
        index = torch.tensor([rows, slots], dtype=torch.long, device=self.device)
        return QueryCapture(index[0], index[1], store)
