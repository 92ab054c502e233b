"""KV storage paged per (layer, KV head), with per-slot metric and original position.

Layout (all tensors on ``config.device``):

* ``k_pool``, ``v_pool``: ``[num_blocks, block_size, head_dim]``, ONE pool for all layers and
  heads, so a block freed by any head can be reused by any other head, layer or sequence.
* ``k_scale``, ``v_scale``: ``[num_layers, num_kv_heads]`` fp32 dequantisation scales of fp8
  pools (see ``cache/quant.py``); ones for other dtypes.
* ``metric``: ``[num_blocks, block_size]`` fp32 eviction metric per cached KV.
* ``position``: ``[num_blocks, block_size]`` int32 original token position per cached KV.
* ``block_tables``: ``[num_layers, max_seqs, num_kv_heads, max_blocks_per_head]`` (-1: none).
* ``context_lens``: ``[num_layers, max_seqs, num_kv_heads]`` KVs held by each head.
* ``seq_lens``: ``[max_seqs]`` tokens seen by each sequence (its next position).
* ``pool.refcount``: ``[num_blocks]`` block-table entries referencing each block.

Sequences may share blocks: :meth:`PagedKVCache.fork_seq` copies a sequence's tables and
counts one more reference to each block. A write into a shared block copies it first
(copy-on-write, one (layer, KV head) block at a time): an append into a shared partial last
block (:meth:`prepare_append`), and compaction's moves (:meth:`copy_on_write`). The eviction
metric is the exception: decode attention adds to the metric of every KV it attends, so a
shared KV's metric sums the attention of every sequence sharing it.

Every per-step operation is tensor code over all (layer, sequence, head) rows at once.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from kvcompress.cache.block_pool import BlockPool, OutOfBlocksError
from kvcompress.cache.config import CacheConfig
from kvcompress.cache.quant import copyable, dequantize, first_scale, is_fp8, quantize


class AppendPlan(NamedTuple):
    """Where the KVs of one step's tokens go.

    ``slots[layer, head, n]`` is the flat slot (``block * block_size + offset``) of token ``n``;
    tokens are ordered by sequence, then by position, as in the flat model layout.
    """

    slots: torch.Tensor  # [num_layers, num_kv_heads, N] long
    positions: torch.Tensor  # [N] long
    token_seq_index: torch.Tensor  # [N] long: index into the step's seq_slots
    # KVs held by the fullest and the emptiest (layer, head) row of each sequence after the
    # append, and by the fullest head of each sequence at each layer (``[layer][seq]``): the
    # widths a step gathers and whether it needs a mask, known on the host without another
    # device sync.
    seq_max_lens: tuple[int, ...] = ()
    seq_min_lens: tuple[int, ...] = ()
    layer_max_lens: tuple[tuple[int, ...], ...] = ()


class HeadView(NamedTuple):
    """Every (layer, head) of some sequences, as rows ``[S, LH]`` with ``LH = layers * kv_heads``.

    Slot ``i`` of a row is the head's ``i``-th held KV in block-table order (not its token
    position); rows are padded to ``width = max_blocks * block_size`` slots.
    """

    blocks: torch.Tensor  # [S, LH, max_blocks] long block ids (0 where the head has none)
    lens: torch.Tensor  # [S, LH] long: KVs held
    block_size: int

    @property
    def width(self) -> int:
        return self.blocks.shape[-1] * self.block_size

    def valid(self) -> torch.Tensor:
        """``[S, LH, width]`` bool: the slot holds a KV."""
        return torch.arange(self.width, device=self.lens.device) < self.lens.unsqueeze(-1)

    def gather(self, per_slot: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """A per-slot pool (``[num_blocks, block_size, ...]``) as ``[S, LH, width, ...]``.

        ``out``, if given, must hold ``S * LH * max_blocks`` rows of the pool's row shape.
        """
        S, LH, nb = self.blocks.shape
        index = self.blocks.reshape(-1)
        if out is None:
            rows = per_slot.index_select(0, index)
        else:
            rows = torch.index_select(per_slot, 0, index, out=out.view(-1, *per_slot.shape[1:]))
        return rows.view(S, LH, nb * self.block_size, *per_slot.shape[2:])

    def flat_slots(self, seq: torch.Tensor, row: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Flat slot ids (``block * block_size + offset``) of the given (sequence, row, slot)."""
        bs = self.block_size
        return self.blocks[seq, row, torch.div(index, bs, rounding_mode="floor")] * bs + index % bs


class CacheAudit(NamedTuple):
    """The pool checked against the block tables; every count but the first three is 0
    when the cache is consistent, and ``pool_used == table_distinct``."""

    pool_used: int  # blocks the pool has handed out
    table_held: int  # block-table entries referencing a block, over all sequences
    table_distinct: int  # distinct blocks the tables reference (shared ones once)
    leaked: int  # handed out by the pool but referenced by no table
    # Blocks whose pool reference count differs from the table entries pointing at them
    # (sharing is legal, uncounted sharing is not).
    refcount_mismatch: int
    referenced_free: int  # referenced by a table while on the pool's free stack
    overheld_rows: int  # (layer, seq, head) rows holding blocks past ceil(len / block_size)
    short_rows: int  # rows missing a block inside ceil(len / block_size)
    double_freed: int  # blocks on the pool's free stack more than once

    @property
    def ok(self) -> bool:
        return (
            self.pool_used == self.table_distinct
            and not self.leaked
            and not self.refcount_mismatch
            and not self.referenced_free
            and not self.overheld_rows
            and not self.short_rows
            and not self.double_freed
        )


def debug_from_env() -> bool:
    """``KVCOMPRESS_DEBUG`` set to anything but empty or ``0``."""
    return os.environ.get("KVCOMPRESS_DEBUG", "") not in ("", "0")


def _ceil_div(a: torch.Tensor, b: int) -> torch.Tensor:
    return torch.div(a + (b - 1), b, rounding_mode="floor")


class PagedKVCache:
    def __init__(self, config: CacheConfig, debug_checks: bool | None = None) -> None:
        self.config = config
        c = config
        dev = c.device
        self.block_size = c.block_size
        self.num_layers = c.num_layers
        self.num_kv_heads = c.num_kv_heads
        self.head_dim = c.head_dim
        self.pool = BlockPool(c.num_blocks, dev)
        self.k_pool = torch.zeros(c.num_blocks, c.block_size, c.head_dim, dtype=c.dtype, device=dev)
        self.v_pool = torch.zeros_like(self.k_pool)
        self.quantized = is_fp8(c.dtype)
        scale_shape = (c.num_layers, c.num_kv_heads)
        self.k_scale = torch.ones(scale_shape, dtype=torch.float32, device=dev)
        self.v_scale = torch.ones(scale_shape, dtype=torch.float32, device=dev)
        # Layers whose fp8 scales are fixed (by their first write): known on the host, so
        # later writes neither reduce the inputs again nor sync.
        self._scaled_layers = [False] * c.num_layers
        self.metric = torch.zeros(c.num_blocks, c.block_size, dtype=torch.float32, device=dev)
        self.position = torch.zeros(c.num_blocks, c.block_size, dtype=torch.int32, device=dev)
        table_shape = (c.num_layers, c.max_seqs, c.num_kv_heads, c.max_blocks_per_head)
        self.block_tables = torch.full(table_shape, -1, dtype=torch.long, device=dev)
        self.context_lens = torch.zeros(
            c.num_layers, c.max_seqs, c.num_kv_heads, dtype=torch.long, device=dev
        )
        self.seq_lens = torch.zeros(c.max_seqs, dtype=torch.long, device=dev)
        self._free_seq_slots = list(range(c.max_seqs - 1, -1, -1))
        self._seq_in_use = [False] * c.max_seqs
        self._layer_index = torch.arange(c.num_layers, device=dev)
        self._head_index = torch.arange(c.num_kv_heads, device=dev)
        # Full argument checks on every append (see prepare_append): off by default for
        # speed, on with KVCOMPRESS_DEBUG=1 (the test suite sets it) or debug_checks=True.
        self.debug_checks = debug_checks if debug_checks is not None else debug_from_env()

    # ----------------------------------------------------------------- sequences
    def allocate_seq(self) -> int:
        """A free sequence row in the block tables."""
        if not self._free_seq_slots:
            raise RuntimeError(f"all {self.config.max_seqs} sequence slots are in use")
        slot = self._free_seq_slots.pop()
        self._seq_in_use[slot] = True
        return slot

    def fork_seq(self, src: int) -> int:
        """A new sequence sharing every block of ``src``: its tables, lengths and position
        are copied and each block counts one more reference (no KV is copied)."""
        self._check_live([src])
        dst = self.allocate_seq()
        rows = self.block_tables[:, src]
        self.block_tables[:, dst] = rows
        self.pool.share(rows[rows >= 0])
        self.context_lens[:, dst] = self.context_lens[:, src]
        self.seq_lens[dst] = self.seq_lens[src]
        return dst

    def free_seq(self, slot: int) -> None:
        """Drop a sequence's references to its blocks (those no other sequence shares
        return to the pool) and release its row."""
        self._check_live([slot])
        rows = self.block_tables[:, slot]
        held = rows >= 0
        self.pool.free(rows[held])
        rows.fill_(-1)
        self.context_lens[:, slot].zero_()
        self.seq_lens[slot] = 0
        self._seq_in_use[slot] = False
        self._free_seq_slots.append(slot)

    @property
    def num_free_seq_slots(self) -> int:
        return len(self._free_seq_slots)

    def _check_live(self, slots: list[int]) -> None:
        for slot in slots:
            if not 0 <= slot < self.config.max_seqs or not self._seq_in_use[slot]:
                raise ValueError(f"sequence slot {slot} is not allocated")

    # ----------------------------------------------------------------- appends
    def blocks_for(self, num_tokens: int) -> int:
        """Blocks ``num_tokens`` tokens take in every (layer, head) of an empty sequence."""
        return self.num_layers * self.num_kv_heads * -(-num_tokens // self.block_size)

    def blocks_needed(self, seq_slots: torch.Tensor, num_tokens: torch.Tensor) -> int:
        """Blocks an append of ``num_tokens[i]`` tokens to each ``seq_slots[i]`` would allocate
        (new blocks plus copies of shared partial last blocks)."""
        seq_slots = seq_slots.to(device=self.config.device, dtype=torch.long)
        num_tokens = num_tokens.to(device=self.config.device, dtype=torch.long)
        lens = self.context_lens[:, seq_slots, :]
        new_lens = lens + num_tokens.view(1, -1, 1)
        bs = self.block_size
        grow = _ceil_div(new_lens, bs) - _ceil_div(lens, bs)
        cow = self._shared_tails(seq_slots, lens, num_tokens)
        return int((grow.sum() + cow.sum()).item())

    def _shared_tails(
        self, seq_slots: torch.Tensor, lens: torch.Tensor, num_tokens: torch.Tensor
    ) -> torch.Tensor:
        """``[L, B, H]`` bool: the row's append writes into a partial last block that another
        row shares (so it must copy it first)."""
        bs = self.block_size
        L, H = self.num_layers, self.num_kv_heads
        partial = (lens % bs != 0) & (num_tokens.view(1, -1, 1) > 0)
        col = torch.div(lens, bs, rounding_mode="floor").clamp(max=self.block_tables.shape[-1] - 1)
        last = self.block_tables[
            self._layer_index.view(L, 1, 1),
            seq_slots.view(1, -1, 1),
            self._head_index.view(1, 1, H),
            col,
        ]
        return partial & (self.pool.refcount[last.clamp(min=0)] > 1)

    def copy_on_write(
        self, layer: torch.Tensor, seq: torch.Tensor, head: torch.Tensor, col: torch.Tensor
    ) -> torch.Tensor:
        """Give each table entry ``(layer[i], seq[i], head[i], col[i])`` a private copy of its
        block (K, V, metric, position), dropping its reference to the shared one; returns
        the new block ids. Raises :class:`OutOfBlocksError` before any change."""
        old = self.block_tables[layer, seq, head, col]
        new = self.pool.allocate(old.numel())
        if old.numel():
            for pool in (copyable(self.k_pool), copyable(self.v_pool), self.metric, self.position):
                pool[new] = pool[old]
            self.block_tables[layer, seq, head, col] = new
            self.pool.free(old)
        return new

    def prepare_append(self, seq_slots: torch.Tensor, num_tokens: torch.Tensor) -> AppendPlan:
        """Allocate room for the next tokens of every head of the given sequences.

        Writes positions and a zero metric for the new slots; K and V are written per layer
        by :meth:`write`. Raises :class:`OutOfBlocksError` before changing anything when the
        pool is short. Arguments are checked fully only with :attr:`debug_checks` (each
        check costs Python loops or device syncs every step); ``max_model_len`` always.
        """
        seq_slots = seq_slots.to(device=self.config.device, dtype=torch.long)
        num_tokens = num_tokens.to(device=self.config.device, dtype=torch.long)
        if seq_slots.numel() != num_tokens.numel():
            raise ValueError("seq_slots and num_tokens must have the same length")
        if self.debug_checks:
            self._check_append(seq_slots, num_tokens)

        bs = self.block_size
        L, H = self.num_layers, self.num_kv_heads
        B = seq_slots.numel()
        dev = self.config.device
        if B == 0:
            empty = torch.empty(0, dtype=torch.long, device=dev)
            return AppendPlan(torch.empty(L, H, 0, dtype=torch.long, device=dev), empty, empty)
        lens = self.context_lens[:, seq_slots, :]  # [L, B, H]
        new_lens = lens + num_tokens.view(1, -1, 1)
        old_nb = _ceil_div(lens, bs)
        need = (_ceil_div(new_lens, bs) - old_nb).reshape(-1)
        start_pos = self.seq_lens[seq_slots]
        new_seq_lens = start_pos + num_tokens
        cow = self._shared_tails(seq_slots, lens, num_tokens)  # [L, B, H]
        # Everything the host needs from the device, in one sync.
        counts = torch.stack(
            (need.sum(), num_tokens.sum(), num_tokens.max(), new_seq_lens.max(), cow.sum())
        )
        head_max = new_lens.amax(dim=2)  # [L, B]
        host = torch.cat((counts, new_lens.amin(dim=(0, 2)), head_max.reshape(-1))).tolist()
        total, n_total, most, max_seq_len, n_cow = host[:5]
        seq_min = tuple(host[5 : 5 + B])
        layer_max = tuple(tuple(host[5 + B * (1 + i) : 5 + B * (2 + i)]) for i in range(L))
        seq_max = tuple(map(max, zip(*layer_max, strict=True)))
        if max_seq_len > self.config.max_model_len:
            raise ValueError(
                f"append would exceed max_model_len={self.config.max_model_len} tokens"
            )
        if total + n_cow > self.pool.num_free:  # before any change
            raise OutOfBlocksError(total + n_cow, self.pool.num_free)
        if n_cow:
            cl, cb, ch = cow.nonzero(as_tuple=True)
            col = torch.div(lens[cl, cb, ch], bs, rounding_mode="floor")
            self.copy_on_write(cl, seq_slots[cb], ch, col)
        blocks = self.pool.allocate(total)

        if total:
            row = torch.repeat_interleave(torch.arange(need.numel(), device=dev), need)
            first = torch.cumsum(need, 0) - need
            col = old_nb.reshape(-1)[row] + torch.arange(total, device=dev) - first[row]
            layer_idx = row // (B * H)
            seq_idx = seq_slots[(row // H) % B]
            head_idx = row % H
            self.block_tables[layer_idx, seq_idx, head_idx, col] = blocks

        # Slot of every new token in every (layer, head).
        if most == 1 and n_total == B:  # decode: one token each, no ragged bookkeeping
            tok_seq = torch.arange(B, device=dev)
            logical = lens  # [L, N, H]
            positions = start_pos
            seq_of_tok = seq_slots
        else:
            tok_seq = torch.repeat_interleave(torch.arange(B, device=dev), num_tokens)
            tok_first = (torch.cumsum(num_tokens, 0) - num_tokens)[tok_seq]
            t = torch.arange(n_total, device=dev) - tok_first  # offset within its append
            logical = lens[:, tok_seq, :] + t.view(1, -1, 1)  # [L, N, H]
            positions = start_pos[tok_seq] + t
            seq_of_tok = seq_slots[tok_seq]
        block = self.block_tables[
            self._layer_index.view(L, 1, 1),
            seq_of_tok.view(1, -1, 1),
            self._head_index.view(1, 1, H),
            torch.div(logical, bs, rounding_mode="floor"),
        ]
        slots = (block * bs + logical % bs).permute(0, 2, 1).contiguous()  # [L, H, N]

        flat = slots.view(-1)
        self.position.view(-1)[flat] = positions.to(torch.int32).repeat(L * H)
        self.metric.view(-1)[flat] = 0.0
        self.context_lens[:, seq_slots, :] = new_lens
        self.seq_lens[seq_slots] = new_seq_lens
        return AppendPlan(slots, positions, tok_seq, seq_max, seq_min, layer_max)

    def _check_append(self, seq_slots: torch.Tensor, num_tokens: torch.Tensor) -> None:
        if bool((num_tokens < 0).any()):
            raise ValueError("num_tokens must be non-negative")
        slot_list = seq_slots.tolist()
        if len(set(slot_list)) != len(slot_list):
            raise ValueError("a sequence may appear only once in an append")
        self._check_live(slot_list)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one layer's keys and values: ``slots [H, N]``, ``k, v [N, H, head_dim]``."""
        self.write_tokens(slots.transpose(0, 1).reshape(-1), k, v, layer=layer)

    def write_tokens(
        self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int | None = None
    ) -> None:
        """:meth:`write` with token-major slots ``[N * H]`` (a layer's ``AppendPlan.slots``
        transposed): ``k, v [N, H, head_dim]`` as models produce them go in without a
        transposed copy. Converted to the pool's dtype; fp8 pools need ``layer`` (its
        scales)."""
        d = self.head_dim
        k, v = self._to_storage(layer, k, v)
        copyable(self.k_pool).view(-1, d).index_copy_(0, slots, k.reshape(-1, d))
        copyable(self.v_pool).view(-1, d).index_copy_(0, slots, v.reshape(-1, d))

    def _to_storage(self, layer: int | None, k: torch.Tensor, v: torch.Tensor):
        dtype = self.k_pool.dtype
        if not self.quantized:
            return (k, v) if k.dtype == dtype else (k.to(dtype), v.to(dtype))
        if layer is None:
            raise ValueError("writes to an fp8 cache need the layer (its scales)")
        if not self._scaled_layers[layer] and k.shape[0]:
            self.k_scale[layer] = first_scale(k)
            self.v_scale[layer] = first_scale(v)
            self._scaled_layers[layer] = True
        k = quantize(k, self.k_scale[layer]).view(torch.uint8)
        return k, quantize(v, self.v_scale[layer]).view(torch.uint8)

    def reset_scales(self) -> None:
        """Let the next write of each layer fix its fp8 scales again (in place: whatever
        reads the scale tensors, a captured CUDA graph too, sees the new values). For writes
        that were not a real sequence's, such as a graph capture's warm-up."""
        self.k_scale.fill_(1.0)
        self.v_scale.fill_(1.0)
        self._scaled_layers = [False] * self.num_layers

    def dequantize(self, layer: int, pool_rows: torch.Tensor, which: str, dtype: torch.dtype):
        """Gathered pool rows ``[..., H, W, D]`` of one layer in ``dtype`` (fp8: scaled by the
        layer's ``k_scale`` / ``v_scale``, ``which`` = "k" or "v"; others: cast only)."""
        if not self.quantized:
            return pool_rows if pool_rows.dtype == dtype else pool_rows.to(dtype)
        scale = self.k_scale if which == "k" else self.v_scale
        return dequantize(pool_rows, scale[layer], dtype)

    # ----------------------------------------------------------------- views
    def head_view(self, seq_slots: torch.Tensor) -> HeadView:
        """The block tables of every (layer, head) of the given sequences."""
        seq_slots = seq_slots.to(device=self.config.device, dtype=torch.long)
        S = seq_slots.numel()
        LH = self.num_layers * self.num_kv_heads
        lens = self.context_lens[:, seq_slots, :].permute(1, 0, 2).reshape(S, LH)
        lmax = int(lens.max().item()) if S else 0
        nb = -(-lmax // self.block_size)
        tables = self.block_tables[:, seq_slots, :, :nb].permute(1, 0, 2, 3).reshape(S, LH, nb)
        return HeadView(tables.clamp(min=0), lens, self.block_size)

    def tables_for(self, layer: int, seq_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(block_tables [B, H, max_blocks], context_lens [B, H])`` of one layer."""
        return self.block_tables[layer, seq_slots], self.context_lens[layer, seq_slots]

    # ----------------------------------------------------------------- statistics
    # Memory figures count the block tables and the pool, never ``ceil(context_lens / bs)``:
    # a block that a table holds beyond its head's length, or that the pool handed out and no
    # table references, is memory in use, and a figure derived from lengths would hide it.
    def kept_per_layer_head(self, slot: int) -> torch.Tensor:
        """``[num_layers, num_kv_heads]`` KVs held by each head of one sequence."""
        return self.context_lens[:, slot].clone()

    def blocks_held(self, slot: int) -> int:
        """Blocks the sequence's block-table rows reference (its real memory)."""
        return int((self.block_tables[:, slot] >= 0).sum().item())

    def physical_kvs(self, slot: int) -> int:
        """KV slots the sequence occupies in the pool: ``blocks_held * block_size``."""
        return self.blocks_held(slot) * self.block_size

    def blocks_for_kept(self, slot: int) -> int:
        """Blocks the sequence *should* hold: ``ceil(kept / block_size)`` summed over heads."""
        return int(_ceil_div(self.context_lens[:, slot], self.block_size).sum().item())

    def blocks_shared(self, slot: int) -> int:
        """Of :meth:`blocks_held`, the entries whose block other entries reference too."""
        rows = self.block_tables[:, slot]
        held = rows[rows >= 0]
        return int((self.pool.refcount[held] > 1).sum().item())

    def held_block_count(self) -> int:
        """Block-table entries referencing a block, over every table (a shared block once
        per reference); equals ``pool.num_used`` when nothing is shared or leaked."""
        return int((self.block_tables >= 0).sum().item())

    def distinct_block_count(self) -> int:
        """Distinct blocks the tables reference: ``pool.num_used`` unless a leak."""
        held = self.block_tables[self.block_tables >= 0]
        return int(held.unique().numel())

    def audit(self) -> CacheAudit:
        """Check the pool against the block tables (a full scan: for tests and metrics)."""
        tables = self.block_tables
        held = tables >= 0
        referenced = tables[held]
        counts = torch.bincount(referenced, minlength=self.num_blocks)
        free_counts = torch.bincount(self.pool.free_ids(), minlength=self.num_blocks)
        is_free = free_counts > 0
        in_use = ~is_free
        need = _ceil_div(self.context_lens, self.block_size)  # [L, S, H]
        cols = torch.arange(tables.shape[-1], device=tables.device)
        within = cols < need.unsqueeze(-1)
        return CacheAudit(
            pool_used=self.pool.num_used,
            table_held=int(referenced.numel()),
            table_distinct=int((counts > 0).sum().item()),
            leaked=int((in_use & (counts == 0)).sum().item()),
            refcount_mismatch=int((counts != self.pool.refcount).sum().item()),
            referenced_free=int((is_free & (counts > 0)).sum().item()),
            overheld_rows=int((held & ~within).any(dim=-1).sum().item()),
            short_rows=int((~held & within).any(dim=-1).sum().item()),
            double_freed=int((free_counts > 1).sum().item()),
        )

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks
