"""Swapping a sequence's KVs out of the pool to host memory and back.

A preempted sequence would otherwise be recomputed: its prompt and output fed again, and (if
it compresses) compressed again from scratch, which costs a prefill and may keep other KVs
than it held. Swapped out, it keeps exactly what it held: every block of every (layer, KV
head) row in table order, with the blocks' metric and positions, in one host tensor per
pool, and the rows' block counts and lengths. Swapped in, it gets fresh blocks (shared blocks
come back as private copies) in a free sequence row, the same KVs in the same logical slots.

Each move is one gather (or scatter) per pool: no loop over layers, heads or blocks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kvcompress.cache.paged_cache import PagedKVCache
from kvcompress.cache.quant import copyable


class SwappedSeq(NamedTuple):
    """A sequence's blocks on the host, in row-major (layer, head, block) order."""

    block_counts: torch.Tensor  # [L, H] blocks each row held
    context_lens: torch.Tensor  # [L, H] KVs each row held
    seq_len: int  # tokens the sequence had appended
    k: torch.Tensor  # [num_blocks, block_size, head_dim] (fp8 pools: as bytes)
    v: torch.Tensor
    metric: torch.Tensor  # [num_blocks, block_size]
    position: torch.Tensor  # [num_blocks, block_size]

    @property
    def num_blocks(self) -> int:
        return self.k.shape[0]

    def blocks_for_one_token(self, block_size: int) -> int:
        """Blocks one more token takes once swapped back in: one for each row whose last
        block is full (the rows come back in blocks of their own, shared with nobody)."""
        return int((self.context_lens % block_size == 0).sum())

    @property
    def nbytes(self) -> int:
        """Host bytes held (the KVs and their per-slot metric and position)."""
        parts = (self.k, self.v, self.metric, self.position)
        return sum(t.numel() * t.element_size() for t in parts)


def swap_bytes(cache: PagedKVCache, num_blocks: int) -> int:
    """Host bytes a sequence holding ``num_blocks`` blocks takes when swapped out."""
    return num_blocks * cache.config.bytes_per_block


def swap_out(cache: PagedKVCache, slot: int) -> SwappedSeq:
    """Copy sequence ``slot``'s blocks to the host and free the slot (its blocks return to
    the pool unless another sequence shares them)."""
    cache._check_live([slot])
    rows = cache.block_tables[:, slot]  # [L, H, max_blocks]: each row's blocks first
    held = rows >= 0
    ids = rows[held]
    on_cuda = cache.config.device.type == "cuda"

    def to_host(pool: torch.Tensor) -> torch.Tensor:
        rows_out = pool.index_select(0, ids)
        if not on_cuda:
            return rows_out
        host = torch.empty(rows_out.shape, dtype=rows_out.dtype, pin_memory=True)
        return host.copy_(rows_out)

    swapped = SwappedSeq(
        block_counts=held.sum(dim=-1).cpu(),
        context_lens=cache.context_lens[:, slot].to("cpu", copy=True),
        seq_len=int(cache.seq_lens[slot]),
        k=to_host(copyable(cache.k_pool)),
        v=to_host(copyable(cache.v_pool)),
        metric=to_host(cache.metric),
        position=to_host(cache.position),
    )
    cache.free_seq(slot)
    return swapped


def swap_in(cache: PagedKVCache, swapped: SwappedSeq) -> int:
    """A new sequence slot holding what ``swapped`` held, in fresh blocks. Raises
    ``OutOfBlocksError`` (changing nothing) when the pool cannot hold them."""
    dev = cache.config.device
    blocks = cache.pool.allocate(swapped.num_blocks)
    try:
        slot = cache.allocate_seq()
    except RuntimeError:
        cache.pool.free(blocks)
        raise
    for pool, host in (
        (copyable(cache.k_pool), swapped.k),
        (copyable(cache.v_pool), swapped.v),
        (cache.metric, swapped.metric),
        (cache.position, swapped.position),
    ):
        pool.index_copy_(0, blocks, host.to(dev, non_blocking=True))
    counts = swapped.block_counts.to(dev)
    cols = torch.arange(cache.block_tables.shape[-1], device=dev)
    rows = torch.full_like(cache.block_tables[:, slot], -1)
    rows[cols < counts.unsqueeze(-1)] = blocks  # row-major, as swap_out gathered them
    cache.block_tables[:, slot] = rows
    cache.context_lens[:, slot] = swapped.context_lens.to(dev)
    cache.seq_lens[slot] = swapped.seq_len
    return slot
