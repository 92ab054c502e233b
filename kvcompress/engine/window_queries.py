"""The mean query of each sequence's latest observation window (``expected-attention``).

``expected-attention`` scores each KV by the attention that the queries to come are expected
to pay it; the engine's estimate of those queries is the mean of the recent ones. The cache
stores keys, not queries, so for a sequence whose scorer reads it the attention backend
averages, during each of its prefill chunks, the post-RoPE queries of the chunk's last ``w``
tokens (its observation window, ``w`` the request's ``window_size``) in every layer and query
head (``WindowCapture``); after the step the compressor reads it (``ScorerInputs.query_mean``).
Decode steps leave it alone: the window that closed the prompt stays the estimate. The rows
are allocated on the first request that needs them.

No variance is kept. Over a window, post-RoPE queries also spread because each is rotated by
its own position; with that spread as the variance the scorer lost the pass key in most
RULER prompts, where the point estimate kept it under per-head budgets (``docs/quality.md``).
"""

from __future__ import annotations

import torch

from kvcompress.attention.metadata import WindowCapture


class WindowQueries:
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
        self.mean: torch.Tensor | None = None

    def capture(self, windows: list[range], slots: list[int]) -> WindowCapture | None:
        """What the step's backend keeps: ``windows[i]``, flat token rows of the step, is the
        window of the sequence in cache slot ``slots[i]``. None when there is nothing to keep."""
        if not windows:
            return None
        if self.mean is None:
            # A normal tensor even though the step runs in inference mode, as the cache's
            # pools are: the scheduler copies rows into forks outside it.
            with torch.inference_mode(False):
                self.mean = torch.zeros(self.shape, dtype=torch.float32, device=self.device)
        rows = [r for window in windows for r in window]
        which = [i for i, window in enumerate(windows) for _ in window]
        index = torch.tensor([rows, which], dtype=torch.long, device=self.device)
        sizes = torch.tensor([len(w) for w in windows], dtype=torch.float32, device=self.device)
        return WindowCapture(
            rows=index[0],
            windows=index[1],
            sizes=sizes.view(-1, 1, 1),
            slots=torch.tensor(slots, dtype=torch.long, device=self.device),
            mean=self.mean,
        )

    def get(self, slots: list[int]) -> torch.Tensor | None:
        """``[S, L, Hq, D]``: the mean query of these sequences' latest windows (None before
        any was kept)."""
        if self.mean is None:
            return None
        return self.mean[torch.tensor(slots, dtype=torch.long, device=self.device)]

    def copy(self, source: int, dest: int) -> None:
        """A fork starts from its parent's (their prompt is the same)."""
        if self.mean is not None:
            self.mean[dest] = self.mean[source]
