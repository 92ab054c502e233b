"""Swapping a sequence out of the pool and back (cache/swap.py): the same KVs, metric and
positions in the same logical slots of ragged heads, the blocks freed and taken again, forks
left intact, fp8 pools, and a refused swap-in that changes nothing."""

from __future__ import annotations

import pytest
import torch

from kvcompress.cache import (
    FP8,
    CacheConfig,
    OutOfBlocksError,
    PagedKVCache,
    swap_bytes,
    swap_in,
    swap_out,
)
from kvcompress.compress import CompressionParams, Compressor

LAYERS, HEADS, D, BS = 2, 3, 8, 4


def make_cache(blocks: int = 128, dtype: torch.dtype = torch.float32) -> PagedKVCache:
    element = torch.empty((), dtype=dtype).element_size()
    return PagedKVCache(
        CacheConfig(
            num_layers=LAYERS,
            num_kv_heads=HEADS,
            head_dim=D,
            block_size=BS,
            kv_cache_memory=blocks * BS * (2 * D * element + 8),
            dtype=dtype,
            max_seqs=4,
            max_model_len=64,
        )
    )


def filled(cache: PagedKVCache, n: int, seed: int, compress: bool = True) -> int:
    """A sequence of ``n`` random KVs per head with a random metric, then (``compress``)
    compressed at rate 2 so that its heads hold different numbers of KVs."""
    gen = torch.Generator().manual_seed(seed)
    slot = cache.allocate_seq()
    plan = cache.prepare_append(torch.tensor([slot]), torch.tensor([n]))
    for layer in range(LAYERS):
        k, v = (torch.randn(n, HEADS, D, generator=gen) for _ in range(2))
        cache.write_tokens(plan.slots[layer].transpose(0, 1).reshape(-1), k, v, layer=layer)
    cache.metric.view(-1)[plan.slots.reshape(-1)] = torch.rand(plan.slots.numel(), generator=gen)
    if compress:
        params = CompressionParams(compression_rate=2, min_cache_tokens=0, protected_window=2)
        Compressor(cache).compress([slot], [params])
    return slot


def held(cache: PagedKVCache, slot: int) -> dict[str, list]:
    """Every (layer, head) row's KVs, metric and positions in logical slot order."""
    view = cache.head_view(torch.tensor([slot]))
    valid = view.valid()
    out = {"lens": cache.context_lens[:, slot].tolist(), "seq_len": int(cache.seq_lens[slot])}
    for name in ("k_pool", "v_pool"):
        pool = getattr(cache, name)
        rows = pool.view(torch.uint8) if pool.dtype == FP8 else pool
        out[name] = view.gather(rows)[valid].tolist()
    for name in ("metric", "position"):
        out[name] = view.gather(getattr(cache, name))[valid].tolist()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, FP8], ids=["fp32", "fp8"])
def test_a_swapped_sequence_comes_back_with_exactly_what_it_held(dtype) -> None:
    cache = make_cache(dtype=dtype)
    other = filled(cache, 21, seed=1)
    slot = filled(cache, 30, seed=2)
    lens = cache.context_lens[:, slot]
    assert lens.min() < lens.max()  # ragged heads
    before, other_before = held(cache, slot), held(cache, other)
    blocks = cache.blocks_held(slot)
    free = cache.num_free_blocks

    swapped = swap_out(cache, slot)
    assert swapped.num_blocks == blocks
    assert swapped.nbytes == swap_bytes(cache, blocks)
    assert cache.num_free_blocks == free + blocks  # the pool got them back
    new = swap_in(cache, swapped)
    assert cache.num_free_blocks == free
    assert held(cache, new) == before
    assert held(cache, other) == other_before
    assert cache.audit().ok


def test_a_swapped_fork_leaves_its_parent_intact_and_returns_with_private_blocks() -> None:
    cache = make_cache()
    parent = filled(cache, 25, seed=3)
    child = cache.fork_seq(parent)
    before = held(cache, parent)
    used = cache.pool.num_used
    swapped = swap_out(cache, child)
    assert cache.pool.num_used == used  # every block is still the parent's
    new = swap_in(cache, swapped)
    assert held(cache, new) == before == held(cache, parent)
    assert cache.pool.num_used == used + swapped.num_blocks  # copies, not shares
    assert cache.blocks_shared(new) == 0
    assert cache.audit().ok


@pytest.mark.parametrize(
    ("n", "compress", "expected"),
    [(28, False, LAYERS * HEADS), (30, False, 0), (30, True, None)],
    ids=["full-last-blocks", "partial-last-blocks", "compressed"],
)
def test_a_swapped_sequence_knows_what_its_next_token_takes_back_in(n, compress, expected):
    """Counted on the host, it is what an append to the swapped-in rows allocates (a fork's
    rows come back private: no copy of a shared tail either)."""
    cache = make_cache()
    parent = filled(cache, n, seed=5, compress=compress)
    child = cache.fork_seq(parent)
    swapped = swap_out(cache, child)
    counted = swapped.blocks_for_one_token(BS)
    new = swap_in(cache, swapped)
    assert counted == cache.blocks_needed(torch.tensor([new]), torch.tensor([1]))
    if expected is not None:
        assert counted == expected


def test_a_swap_in_the_pool_cannot_hold_changes_nothing() -> None:
    cache = make_cache(blocks=60)
    slot = filled(cache, 30, seed=4)
    swapped = swap_out(cache, slot)
    squatter = filled(cache, 30, seed=5, compress=False)  # 48 of the 60 blocks
    free, slots = cache.num_free_blocks, cache.num_free_seq_slots
    assert free < swapped.num_blocks
    with pytest.raises(OutOfBlocksError):
        swap_in(cache, swapped)
    assert (cache.num_free_blocks, cache.num_free_seq_slots) == (free, slots)
    cache.free_seq(squatter)
    assert held(cache, swap_in(cache, swapped))["seq_len"] == 30
    assert cache.audit().ok
