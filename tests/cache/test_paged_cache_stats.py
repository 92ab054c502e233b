"""Memory statistics come from the block tables and the pool, so that a leak shows.

A figure derived from ``context_lens`` (``ceil(kept / block_size)`` per head) is what memory
*should* be; these tests inject the two kinds of leak (a table row holding a block past its
length, a block handed out by the pool that no table references) and check that the
statistics see them.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcompress.compress import CompressionParams, Compressor
from tests.cache.test_paged_cache import make_cache


def filled(lengths, block_size=4, blocks=64):
    cache = make_cache(block_size=block_size, blocks=blocks)
    slots = [cache.allocate_seq() for _ in lengths]
    cache.prepare_append(torch.tensor(slots), torch.tensor(lengths))
    return cache, slots


def test_consistent_cache_agrees_with_lengths_and_pool():
    cache, (a, b) = filled([5, 9])
    # 2 layers x 2 heads: a needs 2 blocks per head, b 3.
    assert [cache.blocks_held(s) for s in (a, b)] == [8, 12]
    assert [cache.blocks_for_kept(s) for s in (a, b)] == [8, 12]
    assert cache.physical_kvs(b) == 12 * 4
    assert cache.held_block_count() == cache.pool.num_used == 20
    audit = cache.audit()
    assert audit.ok, audit


def test_block_held_past_a_heads_length_is_counted():
    cache, (a, b) = filled([5, 9])
    extra = cache.pool.allocate(1)
    # Row (layer 1, a, head 0) holds 5 KVs in 2 blocks; a third block is a leak.
    cache.block_tables[1, a, 0, 2] = extra[0]
    assert cache.blocks_held(a) == 9 > cache.blocks_for_kept(a) == 8
    assert cache.physical_kvs(a) == 36
    assert cache.blocks_held(b) == 12  # the other sequence is unaffected
    audit = cache.audit()
    assert not audit.ok
    assert audit.overheld_rows == 1
    assert audit.pool_used == audit.table_held == 21  # the pool agrees: the table holds it
    counts = (audit.leaked, audit.refcount_mismatch, audit.referenced_free, audit.short_rows)
    assert counts == (0, 0, 0, 0)
    # free_seq returns it too: nothing stays allocated.
    cache.free_seq(a)
    cache.free_seq(b)
    assert cache.pool.num_free == cache.num_blocks
    assert cache.audit().ok


def test_block_allocated_without_any_table_is_a_leak():
    cache, (a, b) = filled([5, 9])
    cache.pool.allocate(2)
    assert cache.held_block_count() == 20 != cache.pool.num_used == 22
    audit = cache.audit()
    assert (audit.pool_used, audit.table_held, audit.leaked) == (22, 20, 2)
    assert not audit.ok
    # Every sequence's own figures are still right: the leak belongs to no sequence.
    assert cache.blocks_held(a) + cache.blocks_held(b) == 20


def test_block_referenced_twice_or_while_free_is_reported():
    cache, (a, b) = filled([5, 9])
    # Head 1 of a's layer 0 points at the block of its head 0: one block, two owners, but
    # its reference count says one (sharing is legal only when counted).
    cache.block_tables[0, a, 1, 1] = cache.block_tables[0, a, 0, 1]
    audit = cache.audit()
    assert audit.refcount_mismatch == 2 and audit.leaked == 1 and not audit.ok

    cache, (a, b) = filled([5, 9])
    cache.pool.free(cache.block_tables[0, b, 0, :1].clone())  # freed but still in a's table
    audit = cache.audit()
    assert audit.referenced_free == 1 and audit.pool_used == 19 and audit.table_held == 20

    # A block freed twice is refused by its reference count; one pushed onto the free stack
    # twice behind the pool's back is still seen by the audit.
    cache, (a,) = filled([5])
    block = cache.block_tables[0, a, 0, :1].clone()
    cache.block_tables[0, a, 0, 0] = -1
    cache.pool.free(block)
    with pytest.raises(RuntimeError, match="double free"):
        cache.pool.free(block)
    cache.pool._stack[cache.pool._num_free] = block
    cache.pool._num_free += 1
    audit = cache.audit()
    assert audit.double_freed == 1 and audit.short_rows == 1 and not audit.ok


def test_missing_block_inside_a_length_is_reported():
    cache, (a, _) = filled([5, 9])
    cache.block_tables[1, a, 1, 0] = -1  # the block is still allocated: leaked as well
    audit = cache.audit()
    assert audit.short_rows == 1 and audit.leaked == 1
    assert cache.blocks_held(a) == 7 < cache.blocks_for_kept(a)


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=4),
    rate=st.sampled_from([1.5, 2.0, 4.0]),
    seed=st.integers(0, 100),
)
def test_after_compression_tables_lengths_and_pool_agree(lengths, rate, seed):
    cache, slots = filled(lengths, block_size=2, blocks=512)
    gen = torch.Generator().manual_seed(seed)
    cache.metric.copy_(torch.rand(cache.metric.shape, generator=gen))
    stats = Compressor(cache).compress(
        slots,
        [CompressionParams(compression_rate=rate, protected_window=2, min_cache_tokens=0)]
        * len(slots),
    )
    assert cache.audit().ok
    assert sum(cache.blocks_held(s) for s in slots) == cache.pool.num_used
    for s in slots:
        assert cache.blocks_held(s) == cache.blocks_for_kept(s)
        assert cache.physical_kvs(s) >= int(cache.context_lens[:, s].sum())
    before = sum(2 * -(-n // 2) * 2 for n in lengths)  # layers x heads x blocks
    assert cache.held_block_count() == before - stats.blocks_freed


@pytest.mark.parametrize("block_size", [1, 8])
def test_empty_and_freed_sequences_hold_nothing(block_size):
    cache = make_cache(block_size=block_size)
    s = cache.allocate_seq()
    assert cache.blocks_held(s) == cache.physical_kvs(s) == 0
    cache.prepare_append(torch.tensor([s]), torch.tensor([3]))
    assert cache.blocks_held(s) == 4 * -(-3 // block_size)
    cache.free_seq(s)
    assert cache.blocks_held(s) == cache.held_block_count() == 0
    assert cache.audit().ok
