"""Scores put on one scale across heads, for the global selection (``key-norm``,
``expected-attention``): each head's scores as standard deviations from its own mean."""

from __future__ import annotations

import torch


def standardize_per_head(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[S, LH, W]``: each head's scores minus their mean over its held KVs, over their
    standard deviation (a head whose scores are all equal gets 0s; padding is left as is)."""
    weight = valid.float()
    count = weight.sum(dim=-1, keepdim=True).clamp(min=1)
    mean = (scores * weight).sum(dim=-1, keepdim=True) / count
    centred = scores - mean
    std = ((centred * centred * weight).sum(dim=-1, keepdim=True) / count).sqrt()
    return centred / std.clamp(min=torch.finfo(torch.float32).tiny)
