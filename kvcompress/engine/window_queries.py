"""The mean query of each sequence's latest observation window (``expected-attention``).

``expected-attention`` scores each KV by the attention that the queries to come are expected
to pay it; the engine's estimate of those queries is the mean of the recent ones. The cache
stores keys, not queries, so for a sequence whose scorer reads it the attention backend
averages, during each of its prefill chunks, the post-RoPE queries of the chunk's last ``w``
tokens (its observation window, ``w`` the request's ``window_size``) in every layer and query
head (``WindowCapture``); after the step the compressor reads it (``ScorerInputs.query_mean``).
Decode steps leave it alone: the window that closed the prompt stays the estimate. A fork
starts from its parent's row (their prompt is the same).

No variance is kept. Over a window, post-RoPE queries also spread because each is rotated by
its own position; with that spread as the variance the scorer lost the pass key in most
RULER prompts, where the point estimate kept it under per-head budgets (``docs/quality.md``).
"""

from __future__ import annotations

import torch

from kvcompress.attention.metadata import WindowCapture
from kvcompress.engine.query_rows import QueryRows


class WindowQueries(QueryRows):
    def capture(self, windows: list[range], slots: list[int]) -> WindowCapture | None:
        """What the step's backend keeps: ``windows[i]``, flat token rows of the step, is the
        window of the sequence in cache slot ``slots[i]``. None when there is nothing to keep."""
        if not windows:
            return None
        store = self.allocated()
        rows = [r for window in windows for r in window]
        which = [i for i, window in enumerate(windows) for _ in window]
        index = torch.tensor([rows, which], dtype=torch.long, device=self.device)
        sizes = torch.tensor([len(w) for w in windows], dtype=torch.float32, device=self.device)
        return WindowCapture(
            rows=index[0],
            windows=index[1],
            sizes=sizes.view(-1, 1, 1),
            slots=torch.tensor(slots, dtype=torch.long, device=self.device),
            mean=store,
        )
