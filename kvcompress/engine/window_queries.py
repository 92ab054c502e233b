"""The expected query to come of each sequence (``expected-attention``).

``expected-attention`` scores each KV by the attention that the queries to come are expected
to pay it (kvpress's ExpectedAttentionPress, arXiv 2510.00636). The cache stores keys, not
queries, so for a sequence whose scorer reads them the attention backend keeps, during each
of its prefill chunks, the post-RoPE queries of the chunk's last ``w`` tokens (its
observation window) in every layer and query head; after the step this module turns them
into the one query the scorer reads (``ScorerInputs.query_mean``):

1. Each query is rotated back to position 0, so that their mean describes what the model
   asks rather than where each stood.
2. That mean is carried to the ``FUTURE_POSITIONS`` positions after the window by the
   rotation averaged over them. Slow frequencies keep their phase over the average; fast
   ones, whose phase at a future query nobody knows, fade to zero.

No variance is kept: the window's per-dimension variance, rotated alike, cost the pass key in
most RULER prompts (``docs/quality.md``). Decode steps leave the estimate alone: the window
that closed the prompt stays it, carried to the positions after the prompt. A fork starts
from its parent's row (their prompt is the same).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kvcompress.attention.metadata import QueryCapture
from kvcompress.engine.query_rows import QueryRows
from kvcompress.models.rope import RotaryEmbedding, apply_rotary_signed, signed_sin

# How far ahead the averaged rotation looks. kvpress averages over 512 positions; here 64
# kept more of natural text (top-1 agreement 0.934 / 0.902 at rates 4 / 8 against 0.918 /
# 0.887 with 512) and scored as well on RULER (docs/quality.md).
FUTURE_POSITIONS = 64


class WindowQueries(QueryRows):
    """``[max_seqs, L, Hq, D]``: each sequence's expected query to come, post-RoPE, in every
    layer and query head."""

    def __init__(
        self,
        max_seqs: int,
        num_layers: int,
        num_q_heads: int,
        head_dim: int,
        device: torch.device,
        rotary: RotaryEmbedding,
    ) -> None:
        super().__init__(max_seqs, num_layers, num_q_heads, head_dim, device)
        self.rotary = rotary
        self._pending: _Windows | None = None

    def capture(
        self, windows: list[range], slots: list[int], positions: torch.Tensor
    ) -> QueryCapture | None:
        """What the step's backend keeps: ``windows[i]``, flat token rows of the step, is the
        window of the sequence in cache slot ``slots[i]``; ``positions [N]`` are the step's
        token positions. None when there is nothing to keep; else :meth:`finish` after the
        step's forward pass."""
        self._pending = None  # a failed step's windows are not this step's
        if not windows:
            return None
        rows = [r for window in windows for r in window]
        which = [i for i, window in enumerate(windows) for _ in window]
        index = torch.tensor([rows, which], dtype=torch.long, device=self.device)
        sizes = torch.tensor([float(len(w)) for w in windows], device=self.device)
        _, layers, heads, dim = self.shape
        buffer = torch.empty((len(rows), layers, heads, dim), device=self.device)
        self._pending = _Windows(
            queries=buffer,
            windows=index[1],
            positions=positions[index[0]],
            ends=positions[torch.tensor([w[-1] for w in windows], device=self.device)],
            sizes=sizes.view(-1, 1, 1, 1),
            slots=torch.tensor(slots, dtype=torch.long, device=self.device),
        )
        return QueryCapture(index[0], torch.arange(len(rows), device=self.device), buffer)

    def finish(self) -> None:
        """The step's kept windows become their sequences' expected queries."""
        w = self._pending
        if w is None:
            return
        self._pending = None
        cos, sin = self.rotary(w.positions, torch.float32)  # [R, D]
        # Back to position 0: the rotation by -p (cos is even, sin odd).
        pre = apply_rotary_signed(w.queries, _rows(cos), _rows(signed_sin(-sin)))
        count = w.slots.shape[0]
        total = pre.new_zeros((count, *pre.shape[1:])).index_add_(0, w.windows, pre)
        # The rotation averaged over the positions after each window: R(p) is linear in
        # cos(p * f) and sin(p * f), so its mean is the rotation by their means.
        ahead = torch.arange(1, FUTURE_POSITIONS + 1, device=self.device)
        future_cos, future_sin = self.rotary((w.ends.view(-1, 1) + ahead).view(-1), torch.float32)
        c = future_cos.view(count, FUTURE_POSITIONS, -1).mean(dim=1)  # [W, D]
        s = future_sin.view(count, FUTURE_POSITIONS, -1).mean(dim=1)
        expected = apply_rotary_signed(total / w.sizes, _rows(c), _rows(signed_sin(s)))
        self.allocated()[w.slots] = expected


class _Windows(NamedTuple):
    """A step's kept windows, until :meth:`WindowQueries.finish`."""

    queries: torch.Tensor  # [R, L, Hq, D] post-RoPE, window by window
    windows: torch.Tensor  # [R] which window each row belongs to
    positions: torch.Tensor  # [R] each row's token position
    ends: torch.Tensor  # [W] position of each window's last token
    sizes: torch.Tensor  # [W, 1, 1, 1] rows per window
    slots: torch.Tensor  # [W] the sequences' cache slots


def _rows(table: torch.Tensor) -> torch.Tensor:
    """``[N, D]`` cos/sin rows broadcast over layers and heads: ``[N, 1, 1, D]``."""
    return table[:, None, None, :]
