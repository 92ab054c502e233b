"""Turn a request's budget into block allowances.

A budget is an average number of KVs per head. A sequence with ``LH`` (layer, head) rows may
keep ``ceil(target * LH / block_size)`` blocks in all. Every allocation policy gets exactly
that many blocks, so that policies compare like for like; they differ only in how the blocks
are shared among heads.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvcompress.compress.params import CompressionParams


def protected_count(seq_lens: torch.Tensor, protected_window: torch.Tensor, sinks: torch.Tensor):
    """Tokens of each sequence that may never be evicted (recent window plus sinks)."""
    recent = torch.minimum(seq_lens, protected_window)
    return recent + torch.minimum((seq_lens - recent).clamp(min=0), sinks)


def target_kept_per_head(
    seq_lens: torch.Tensor,  # [S] tokens seen
    protected: torch.Tensor,  # [S] never-evictable tokens
    compression_rate: torch.Tensor,  # [S] float, nan where max_cache_tokens is used
    max_cache_tokens: torch.Tensor,  # [S] float, nan where compression_rate is used
    min_cache_tokens: torch.Tensor | None = None,  # [S] floor of a rate's budget
) -> torch.Tensor:
    """Average KVs each head may keep, ``[S]`` float.

    A rate's budget never falls below ``min(min_cache_tokens, seq_lens)``: a rate applied
    to a short prompt would keep too few KVs to answer from. An explicit
    ``max_cache_tokens`` is the caller's choice and is not raised.
    """
    by_rate = protected + (seq_lens - protected).clamp(min=0) / compression_rate
    if min_cache_tokens is not None:
        by_rate = torch.maximum(by_rate, torch.minimum(min_cache_tokens, seq_lens))
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


def blocks_after_compression(
    params: CompressionParams, seq_len: int, num_heads: int, block_size: int
) -> int:
    """Blocks a sequence of ``seq_len`` tokens holds once compressed to its budget.

    The host-side figure behind admission and the "can this ever fit" check: every head
    full when the parameters evict nothing; never fewer than the protected KVs.
    """
    full = num_heads * -(-seq_len // block_size)
    if not params.evicts:
        return full
    value = torch.tensor([float(seq_len)], dtype=torch.float64)
    protected = protected_count(
        value, torch.tensor([float(params.protected_window)]), torch.tensor([float(params.sinks)])
    )
    nan = torch.tensor([math.nan], dtype=torch.float64)

    def given(x: float | None) -> torch.Tensor:
        return nan if x is None else torch.tensor([float(x)], dtype=torch.float64)

    target = target_kept_per_head(
        value,
        protected,
        given(params.compression_rate),
        given(params.max_cache_tokens),
        torch.tensor([float(params.min_cache_tokens)], dtype=torch.float64),
    )
    target = torch.maximum(target, protected.double())
    return min(full, int(allowed_blocks(target, num_heads, block_size).item()))
