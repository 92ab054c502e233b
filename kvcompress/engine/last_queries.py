"""The newest token's query of each sequence whose scorer reads it (``last-query``, TOVA).

The cache stores keys, not queries, so the attention backend keeps, during each step, the
post-RoPE query of such a sequence's newest token in every layer (``QueryCapture``), one row
per cache sequence slot; after the step the compressor reads it (``ScorerInputs.last_queries``).
The rows are allocated on the first request that needs them: an engine whose requests never
ask holds nothing, and a step without such a sequence copies nothing.
"""

from __future__ import annotations

import torch

from kvcompress.attention.metadata import QueryCapture


class LastQueries:
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
        # [max_seqs, L, Hq, D] float32, the precision the scorer computes in.
        self.store: torch.Tensor | None = None

    def capture(self, rows: list[int], slots: list[int]) -> QueryCapture | None:
        """What the step's backend keeps: flat token ``rows[i]`` of the step is the newest
        token of the sequence in cache slot ``slots[i]``. None when there is nothing to keep."""
        if not rows:
            return None
        if self.store is None:
            # A normal tensor even though the step runs in inference mode, as the cache's
            # pools are: the scheduler copies rows into forks outside it.
            with torch.inference_mode(False):
                self.store = torch.zeros(self.shape, dtype=torch.float32, device=self.device)
        index = torch.tensor([rows, slots], dtype=torch.long, device=self.device)
        return QueryCapture(index[0], index[1], self.store)

    def get(self, slots: list[int]) -> torch.Tensor | None:
        """``[S, L, Hq, D]``: the kept queries of these sequences (None before any was kept).
        A row is the query of the sequence's newest token as of its last step."""
        if self.store is None:
            return None
        return self.store[torch.tensor(slots, dtype=torch.long, device=self.device)]

    def copy(self, source: int, dest: int) -> None:
        """A fork starts from its parent's newest query (their newest token is the same)."""
        if self.store is not None:
            self.store[dest] = self.store[source]
