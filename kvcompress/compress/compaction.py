"""Cache moves: pack each head's surviving KVs into its first blocks, then free the rest.

Walking from a head's tail, every surviving KV that lies beyond the head's new length moves
into the lowest evicted slot not yet filled. Destinations are evicted slots and sources are
survivors, so the two sets are disjoint and one gather-then-scatter per tensor does every move
of every head of every sequence in place.

Blocks may be shared between sequences (forks, see ``PagedKVCache.fork_seq``). Only the
blocks that receive a move are written: those of them that are shared are copied first
(copy-on-write), so a compaction never changes what another sequence sees; shared blocks
it only reads from, or drops at a head's tail, lose one reference and stay intact.
"""

from __future__ import annotations

import torch

from kvcompress.cache import HeadView, PagedKVCache, copyable
from kvcompress.compress.planner import EvictionPlan
from kvcompress.compress.workspace import Workspace


def compact(
    cache: PagedKVCache,
    seq_slots: torch.Tensor,
    view: HeadView,
    plan: EvictionPlan,
    workspace: Workspace | None = None,
) -> int:
    """Apply a plan to the cache; returns the net number of blocks returned to the pool
    (those released minus copies of shared blocks). Raises ``OutOfBlocksError`` before any
    change when the pool cannot hold those copies."""
    S, _LH, width = plan.evict_mask.shape
    if S == 0 or width == 0:
        return 0
    dev = view.lens.device
    bs = cache.block_size
    new_lens = view.lens - plan.evict_counts
    inside = torch.arange(width, device=dev) < new_lens.unsqueeze(-1)
    holes = plan.evict_mask & inside
    movers = view.valid() & ~plan.evict_mask & ~inside

    copied = _unshare_destinations(cache, seq_slots, view, holes)
    hs, hl, hp = holes.nonzero(as_tuple=True)  # per head, ascending slot order
    ms, ml, mp = movers.flip(-1).nonzero(as_tuple=True)  # per head, from the tail
    if hs.numel():
        dst = view.flat_slots(hs, hl, hp)
        src = view.flat_slots(ms, ml, width - 1 - mp)
        workspace = workspace or Workspace(dev)
        d = cache.head_dim
        n = src.numel()
        # fp8 pools move as bytes (see copyable).
        for pool in (copyable(cache.k_pool).view(-1, d), copyable(cache.v_pool).view(-1, d)):
            staged = workspace.get("moved_kv", (n, d), pool.dtype)
            pool.index_copy_(0, dst, torch.index_select(pool, 0, src, out=staged))
        for per_slot in (cache.metric.view(-1), cache.position.view(-1)):
            staged = workspace.get("moved_meta", (n,), per_slot.dtype)
            per_slot.index_copy_(0, dst, torch.index_select(per_slot, 0, src, out=staged))

    # Return the blocks past each head's new end to the pool.
    old_nb = torch.div(view.lens + bs - 1, bs, rounding_mode="floor")
    new_nb = torch.div(new_lens + bs - 1, bs, rounding_mode="floor")
    cols = torch.arange(view.blocks.shape[-1], device=dev)
    freed = (cols >= new_nb.unsqueeze(-1)) & (cols < old_nb.unsqueeze(-1))
    fs, fl, fc = freed.nonzero(as_tuple=True)
    blocks = view.blocks[fs, fl, fc]
    released = cache.pool.free(blocks)
    H = cache.num_kv_heads
    cache.block_tables[fl // H, seq_slots[fs], fl % H, fc] = -1
    cache.context_lens[:, seq_slots, :] = new_lens.view(S, cache.num_layers, H).permute(1, 0, 2)
    return released - copied


def _unshare_destinations(
    cache: PagedKVCache, seq_slots: torch.Tensor, view: HeadView, holes: torch.Tensor
) -> int:
    """Copy-on-write of the shared blocks that receive moves (``holes [S, LH, width]``);
    ``view.blocks`` is updated to the copies. Returns the number of copies."""
    S, LH, nb = view.blocks.shape
    written = holes.view(S, LH, nb, cache.block_size).any(dim=-1)  # [S, LH, nb]
    shared = written & (cache.pool.refcount[view.blocks] > 1)
    s, lh, c = shared.nonzero(as_tuple=True)
    if s.numel() == 0:
        return 0
    H = cache.num_kv_heads
    view.blocks[s, lh, c] = cache.copy_on_write(lh // H, seq_slots[s], lh % H, c)
    return int(s.numel())
