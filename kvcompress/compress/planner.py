"""Block-aligned eviction planning (the KV-Compress choice of what to evict).

Inputs are per (sequence, layer-head) rows of eviction scores in logical slot order, with
+inf for KVs that may not be evicted (protected, sinks, padding). For a head holding ``n`` KVs
whose last block holds ``hang`` of them, evicting its ``j * block_size + hang`` lowest KVs frees
exactly ``j + 1`` blocks; that chunk's score is the largest metric it evicts. Scores rise
within a head, so taking the lowest chunks of a sequence gives each head a prefix of its
chunks. Ties are broken by chunk index first (a stable sort over a chunk-major layout), which
keeps that prefix property even among equal scores, so the requested number of blocks is
always freed exactly (or every evictable block if fewer).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class EvictionPlan(NamedTuple):
    evict_mask: torch.Tensor  # [S, LH, Lmax] bool, in logical slot order
    evict_counts: torch.Tensor  # [S, LH] KVs evicted per head
    blocks_freed: torch.Tensor  # [S, LH] blocks freed per head


def chunk_scores(sorted_scores: torch.Tensor, lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[S, LH, max_blocks]``: the score of freeing ``j + 1`` blocks of each head."""
    lmax = sorted_scores.shape[-1]
    num_blocks = torch.div(lens + block_size - 1, block_size, rounding_mode="floor")
    hang = lens - (num_blocks - 1) * block_size  # KVs in the last, partial block
    max_blocks = -(-lmax // block_size)
    j = torch.arange(max_blocks, device=lens.device)
    idx = j * block_size + hang.unsqueeze(-1) - 1
    in_head = j < num_blocks.unsqueeze(-1)
    scores = torch.gather(sorted_scores, -1, idx.clamp(0, max(lmax - 1, 0)))
    return scores.masked_fill(~in_head, float("inf"))


def select_global(chunks: torch.Tensor, blocks_to_free: torch.Tensor) -> torch.Tensor:
    """Chunks freed per head ``[S, LH]`` when each sequence frees its lowest chunks."""
    S, LH, max_blocks = chunks.shape
    flat = chunks.transpose(1, 2).reshape(S, max_blocks * LH)  # chunk-major for tie-breaking
    ordered, order = torch.sort(flat, dim=1, stable=True)
    rank = torch.arange(flat.shape[1], device=chunks.device)
    take = (rank < blocks_to_free.unsqueeze(1)) & torch.isfinite(ordered)
    chosen = torch.zeros_like(take).scatter(1, order, take)
    return chosen.view(S, max_blocks, LH).sum(dim=1)


def select_global_with_layer_floor(
    chunks: torch.Tensor,
    held: torch.Tensor,
    allowed: torch.Tensor,
    num_layers: int,
    layer_floor: torch.Tensor,
) -> torch.Tensor:
    """Chunks freed per head ``[S, LH]`` (rows layer-major) when each layer first keeps its
    best blocks up to ``layer_floor`` (``[S]``, 0..1) of an even share of the sequence's
    evictable allowance, its heads competing for them, and the global selection then frees
    the sequence's lowest chunks among the rest.

    ``held`` ``[S, LH]`` are the blocks each head holds, ``allowed`` ``[S]`` the blocks the
    sequence may keep. Blocks that may not be evicted (protected, sinks) count against their
    own layer first. A floor of 0 is :func:`select_global`; 1 gives every layer the same
    budget (heads compete within a layer, as in Ada-KV).
    """
    S, LH, max_blocks = chunks.shape
    heads = LH // num_layers

    def per_layer(t: torch.Tensor) -> torch.Tensor:
        return t.view(S, num_layers, heads).sum(dim=2)

    fixed = held - torch.isfinite(chunks).sum(dim=-1)
    spare = (allowed - fixed.sum(dim=1)).clamp(min=0)
    share = torch.floor(spare.double() * layer_floor.double() / num_layers).long()
    keep = per_layer(fixed) + share.unsqueeze(1)  # [S, L] blocks each layer keeps at least
    free_in_layer = (per_layer(held) - keep).clamp(min=0)
    below_floor = select_global(
        chunks.view(S * num_layers, heads, max_blocks), free_in_layer.view(-1)
    ).view(S, LH)
    # Each head's chunks past those its layer would free are the floor: never freed here.
    j = torch.arange(max_blocks, device=chunks.device)
    candidates = chunks.masked_fill(j >= below_floor.unsqueeze(-1), float("inf"))
    return select_global(candidates, (held.sum(dim=1) - allowed).clamp(min=0))


def select_per_head(
    chunks: torch.Tensor, lens: torch.Tensor, allowed: torch.Tensor, block_size: int
):
    """Chunks freed per head ``[S, LH]`` when each head may keep ``allowed`` blocks."""
    num_blocks = torch.div(lens + block_size - 1, block_size, rounding_mode="floor")
    evictable = torch.isfinite(chunks).sum(dim=-1)
    return torch.minimum((num_blocks - allowed).clamp(min=0), evictable)


def plan_from_chunks(
    scores: torch.Tensor,
    sorted_scores: torch.Tensor,
    lens: torch.Tensor,
    chunks_freed: torch.Tensor,
    block_size: int,
) -> EvictionPlan:
    """Expand chunks freed per head into the KVs to evict: the lowest of each head.

    A head evicting ``n`` KVs evicts every KV scored below its ``n``-th lowest score ``t``,
    then as many of those scored exactly ``t`` as are still needed, in slot order: the same
    KVs a stable sort would put first, found without sort indices.
    """
    num_blocks = torch.div(lens + block_size - 1, block_size, rounding_mode="floor")
    hang = lens - (num_blocks - 1) * block_size
    counts = torch.where(chunks_freed > 0, (chunks_freed - 1) * block_size + hang, 0)
    threshold = torch.gather(sorted_scores, -1, (counts - 1).clamp(min=0).unsqueeze(-1))
    threshold = threshold.masked_fill(counts.unsqueeze(-1) == 0, float("-inf"))
    below = scores < threshold
    tied = scores == threshold
    ties_needed = counts - below.sum(dim=-1)
    evict_mask = below | (tied & (torch.cumsum(tied, dim=-1) <= ties_needed.unsqueeze(-1)))
    return EvictionPlan(evict_mask, counts, chunks_freed)


def sort_scores(scores: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's scores in ascending order (values only).

    On CPU the sort runs in place on ``out`` (if given) with NumPy, whose vectorised sort is
    about twice as fast as torch's here, and allocates nothing; elsewhere torch sorts.
    """
    if scores.device.type != "cpu":
        return torch.sort(scores, dim=-1).values
    if out is None:
        out = torch.empty_like(scores)
    out.copy_(scores)
    out.numpy().sort(axis=-1)
    return out
