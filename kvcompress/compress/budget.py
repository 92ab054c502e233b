"""Turn a request's budget into block allowances.

A budget is an average number of KVs per head. A sequence with ``LH`` (layer, head) rows may
keep ``ceil(target * LH / block_size)`` blocks in all. Every allocation policy gets exactly
that many blocks, so that policies compare like for like; they differ only in how the blocks
are shared among heads.
"""

from __future__ import annotations

import torch


def protected_count(seq_lens: torch.Tensor, protected_window: torch.Tensor, sinks: torch.Tensor):
    """Tokens of each sequence that may never be evicted (recent window plus sinks)."""
    recent = torch.minimum(seq_lens, protected_window)
    return recent + torch.minimum((seq_lens - recent).clamp(min=0), sinks)


def target_kept_per_head(
    seq_lens: torch.Tensor,  # [S] tokens seen
    protected: torch.Tensor,  # [S] never-evictable tokens
    compression_rate: torch.Tensor,  # [S] float, nan where max_cache_tokens is used
    max_cache_tokens: torch.Tensor,  # [S] float, nan where compression_rate is used
) -> torch.Tensor:
    """Average KVs each head may keep, ``[S]`` float."""
    by_rate = protected + (seq_lens - protected).clamp(min=0) / compression_rate
    return torch.where(torch.isnan(max_cache_tokens), by_rate, max_cache_tokens)


def allowed_blocks(target: torch.Tensor, num_heads: int, block_size: int) -> torch.Tensor:
    """Blocks each sequence may hold in total, ``[S]`` long."""
    return torch.ceil(target.double() * num_heads / block_size).long()


def spread_evenly(total: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[S] -> [S, num_heads]``: equal shares, the remainder to the first heads."""
    base = torch.div(total, num_heads, rounding_mode="floor").unsqueeze(1)
    rest = (total % num_heads).unsqueeze(1)
    return base + (torch.arange(num_heads, device=total.device) < rest).long()


def spread_pyramid(
    total: torch.Tensor, num_layers: int, num_kv_heads: int, beta: float = 20.0
) -> torch.Tensor:
    """PyramidKV-like shares ``[S, num_layers * num_kv_heads]``: budgets fall linearly with depth.

    The last layer gets ``1 / beta`` of the average and the first layer the rest of twice the
    average, so that the layers' shares still sum to ``total``.
    """
    if num_layers == 1:
        return spread_evenly(total, num_kv_heads)
    low = 1.0 / beta
    high = 2.0 - low
    weights = torch.linspace(high, low, num_layers, dtype=torch.float64, device=total.device)
    ideal = total.double().unsqueeze(1) * weights / weights.sum()  # [S, L]
    per_layer = ideal.floor().long()
    # Largest remainder keeps the total exact while staying deterministic.
    short = total - per_layer.sum(dim=1)
    order = torch.argsort(per_layer - ideal, dim=1, stable=True)
    bonus = (torch.arange(num_layers, device=total.device) < short.unsqueeze(1)).long()
    per_layer = per_layer.scatter_add(1, order, bonus)
    S = total.numel()
    return spread_evenly(per_layer.reshape(-1), num_kv_heads).view(S, num_layers * num_kv_heads)
