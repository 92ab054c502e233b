"""Attention of given queries over every head's held KVs (shared by the query scorers)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from kvcompress.compress.metrics import pool_by_position


class Pooling(NamedTuple):
    """Max-pooling along token positions, per sequence (``pool_by_position``)."""

    positions: torch.Tensor  # [S, LH, W] each slot's token position
    kernels: torch.Tensor  # [S] long: each sequence's pool width (1: none)


def group_attention(
    logits: torch.Tensor,  # [S, LH, G, W] logits of each query head of a KV head's group
    valid: torch.Tensor,  # [S, LH, W] bool: the slot holds a KV
    pooling: Pooling | None = None,
) -> torch.Tensor:
    """Softmax over each head's held KVs, max-pooled along token positions per query head
    if ``pooling`` is given (as the window metric is), summed over the group: ``[S, LH, W]``,
    0 on padding.

    The pooling matters beyond one head: a query attends to a fact's first tokens more than
    to its middle ones, and without it the global selection keeps a number's first digits in
    one head and its last in another (measured in ``docs/quality.md``)."""
    logits = logits.masked_fill(~valid.unsqueeze(2), float("-inf"))
    # A head holding nothing has an all -inf row (NaN after softmax): it scores 0.
    probs = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
    if pooling is not None:
        _, LH, G, W = probs.shape
        kernels = pooling.kernels.tolist()
        for kernel in sorted(set(kernels)):
            rows = [i for i, k in enumerate(kernels) if k == kernel]
            pooled = pool_by_position(
                probs[rows].view(-1, G, W),
                pooling.positions[rows].view(-1, W),
                valid[rows].view(-1, W),
                kernel,
            )
            probs[rows] = pooled.view(len(rows), LH, G, W)
    return probs.sum(dim=2)
