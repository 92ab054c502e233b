"""Attention of given queries over every head's held KVs (shared by the query scorers)."""

from __future__ import annotations

import torch


def group_attention(
    logits: torch.Tensor,  # [S, LH, G, W] logits of each query head of a KV head's group
    valid: torch.Tensor,  # [S, LH, W] bool: the slot holds a KV
) -> torch.Tensor:
    """Softmax over each head's held KVs, summed over the group: ``[S, LH, W]``, 0 on padding."""
    logits = logits.masked_fill(~valid.unsqueeze(2), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    # A head holding nothing has an all -inf row (NaN after softmax): it scores 0.
    return torch.nan_to_num(probs, nan=0.0).sum(dim=2)
