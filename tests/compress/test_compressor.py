"""``Compressor.compress`` refuses a call that names a sequence twice, before any change."""

from __future__ import annotations

import pytest
import torch

from kvcompress.compress import CompressionParams, Compressor

RATE4 = CompressionParams(compression_rate=4.0, protected_window=2, min_cache_tokens=0)


def snapshot(cache):
    tensors = (cache.block_tables, cache.context_lens, cache.k_pool, cache.metric, cache.position)
    return [t.clone() for t in tensors] + [cache.pool.free_ids()]


@pytest.mark.parametrize(
    ("order", "params"),
    [
        ([0, 0], [RATE4, RATE4]),
        ([1, 0, 1], [RATE4, RATE4, RATE4]),
        # Different policies land in different groups, so the two entries would never meet
        # in one pass: still refused.
        (
            [0, 1, 0],
            [
                RATE4,
                RATE4,
                CompressionParams(policy="uniform", compression_rate=2.0, min_cache_tokens=0),
            ],
        ),
        # The repeat does not even evict: a caller bug all the same.
        ([1, 1], [RATE4, CompressionParams()]),
    ],
)
def test_duplicate_sequence_is_rejected_before_any_change(filled_cache, order, params):
    cache, slots = filled_cache([20, 40], lambda layer, head, pos, seq: (pos * 7 + head) % 11)
    before = snapshot(cache)
    dup = slots[order[-1]]
    with pytest.raises(ValueError, match=f"sequence slot {dup} appears more than once"):
        Compressor(cache).compress([slots[i] for i in order], params)
    for a, b in zip(before, snapshot(cache), strict=True):
        assert torch.equal(a, b)
    assert cache.audit().ok


def test_tensor_slots_are_compared_by_value(filled_cache):
    cache, slots = filled_cache([20], lambda layer, head, pos, seq: pos % 5)
    s = torch.tensor(slots[0])
    with pytest.raises(ValueError, match="more than once"):
        Compressor(cache).compress([s, torch.tensor(slots[0])], [RATE4, RATE4])


def test_distinct_sequences_are_compressed_and_the_pool_stays_exact(filled_cache):
    cache, slots = filled_cache([20, 40], lambda layer, head, pos, seq: (pos * 7 + head) % 11)
    used = cache.pool.num_used
    stats = Compressor(cache).compress(slots, [RATE4, RATE4])
    assert stats.sequences == 2 and stats.blocks_freed > 0
    assert cache.pool.num_used == used - stats.blocks_freed == cache.held_block_count()
    assert cache.audit().ok
