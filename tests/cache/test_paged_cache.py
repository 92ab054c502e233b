import pytest
import torch

from kvcompress.cache import CacheConfig, OutOfBlocksError, PagedKVCache


def make_cache(
    block_size=4, blocks=64, layers=2, heads=2, head_dim=4, max_model_len=256, debug_checks=None
):
    bytes_per_block = block_size * (2 * head_dim * 4 + 8)
    cfg = CacheConfig(
        num_layers=layers,
        num_kv_heads=heads,
        head_dim=head_dim,
        kv_cache_memory=blocks * bytes_per_block,
        block_size=block_size,
        max_seqs=8,
        max_model_len=max_model_len,
    )
    return PagedKVCache(cfg, debug_checks=debug_checks)


def held_keys(cache, slot, layer, head):
    n = int(cache.context_lens[layer, slot, head])
    bs = cache.block_size
    blocks = cache.block_tables[layer, slot, head, : -(-n // bs)]
    return cache.k_pool[blocks].reshape(-1, cache.head_dim)[:n]


def test_append_prefill_then_decode_writes_every_head():
    cache = make_cache()
    a, b = cache.allocate_seq(), cache.allocate_seq()
    plan = cache.prepare_append(torch.tensor([a, b]), torch.tensor([5, 3]))
    assert plan.slots.shape == (2, 2, 8)
    assert plan.positions.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    for layer in range(2):
        k = torch.arange(8 * 2 * 4, dtype=torch.float32).view(8, 2, 4) + 1000 * layer
        cache.write(layer, plan.slots[layer], k, -k)
    assert torch.equal(held_keys(cache, a, 1, 1), (torch.arange(64.0).view(8, 2, 4) + 1000)[:5, 1])
    # Decode step: a goes 5 -> 6 and b 3 -> 4, both inside their last blocks.
    used = cache.pool.num_used
    assert cache.blocks_needed(torch.tensor([a, b]), torch.tensor([1, 1])) == 0
    plan = cache.prepare_append(torch.tensor([a, b]), torch.tensor([1, 1]))
    assert cache.pool.num_used == used
    # b goes 4 -> 5: each of its 4 (layer, head) rows needs a new block.
    assert cache.blocks_needed(torch.tensor([a, b]), torch.tensor([1, 1])) == 4
    assert plan.positions.tolist() == [5, 3]
    assert cache.seq_lens[[a, b]].tolist() == [6, 4]
    positions = cache.position.view(-1)[plan.slots[0, 0]]
    assert positions.tolist() == [5, 3]
    cache.prepare_append(torch.tensor([a, b]), torch.tensor([1, 1]))
    assert cache.pool.num_used == used + 4


def test_blocks_allocated_exactly_as_heads_cross_boundaries():
    cache = make_cache(block_size=4)
    s = cache.allocate_seq()
    cache.prepare_append(torch.tensor([s]), torch.tensor([4]))
    assert cache.pool.num_used == 4  # 2 layers x 2 heads x 1 block
    cache.prepare_append(torch.tensor([s]), torch.tensor([1]))
    assert cache.pool.num_used == 8


def test_out_of_blocks_leaves_cache_untouched():
    cache = make_cache(blocks=6)
    s = cache.allocate_seq()
    cache.prepare_append(torch.tensor([s]), torch.tensor([4]))
    before = (cache.block_tables.clone(), cache.context_lens.clone(), cache.pool.num_free)
    with pytest.raises(OutOfBlocksError):
        cache.prepare_append(torch.tensor([s]), torch.tensor([1]))
    assert torch.equal(before[0], cache.block_tables)
    assert torch.equal(before[1], cache.context_lens)
    assert before[2] == cache.pool.num_free


def test_free_seq_returns_every_block():
    cache = make_cache()
    slots = [cache.allocate_seq() for _ in range(3)]
    cache.prepare_append(torch.tensor(slots), torch.tensor([7, 1, 9]))
    for s in slots:
        cache.free_seq(s)
    assert cache.pool.num_free == cache.num_blocks
    assert bool((cache.block_tables == -1).all())
    assert cache.num_free_seq_slots == 8


def test_bad_appends_are_rejected():
    cache = make_cache(max_model_len=8)
    assert cache.debug_checks  # the suite runs with KVCOMPRESS_DEBUG=1 (tests/conftest.py)
    s = cache.allocate_seq()
    with pytest.raises(ValueError, match="max_model_len"):
        cache.prepare_append(torch.tensor([s]), torch.tensor([9]))
    with pytest.raises(ValueError, match="once"):
        cache.prepare_append(torch.tensor([s, s]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="not allocated"):
        cache.prepare_append(torch.tensor([5]), torch.tensor([1]))
    with pytest.raises(ValueError, match="non-negative"):
        cache.prepare_append(torch.tensor([s]), torch.tensor([-1]))
    cache.free_seq(s)
    with pytest.raises(ValueError, match="not allocated"):
        cache.free_seq(s)


def test_full_checks_are_a_debug_option_but_max_model_len_always_holds(monkeypatch):
    monkeypatch.setenv("KVCOMPRESS_DEBUG", "0")
    cache = make_cache(max_model_len=8)
    assert not cache.debug_checks
    s = cache.allocate_seq()
    with pytest.raises(ValueError, match="max_model_len"):
        cache.prepare_append(torch.tensor([s]), torch.tensor([9]))
    assert cache.pool.num_used == 0 and int(cache.seq_lens[s]) == 0
    other = cache.allocate_seq()
    cache.free_seq(other)
    cache.prepare_append(torch.tensor([other]), torch.tensor([1]))  # unchecked: no error
    monkeypatch.setenv("KVCOMPRESS_DEBUG", "1")
    assert make_cache().debug_checks
    assert make_cache(debug_checks=False).debug_checks is False


def test_one_token_appends_take_the_slot_after_each_heads_last_kv():
    cache = make_cache()
    a, b = cache.allocate_seq(), cache.allocate_seq()
    cache.prepare_append(torch.tensor([a, b]), torch.tensor([5, 3]))
    cache.context_lens[1, b, 0] = 2  # a head that holds fewer KVs (as after compression)
    before = cache.context_lens.clone()
    plan = cache.prepare_append(torch.tensor([a, b]), torch.tensor([1, 1]))
    bs = cache.block_size
    for layer in range(2):
        for head in range(2):
            for n, seq in enumerate((a, b)):
                at = int(before[layer, seq, head])
                block = int(cache.block_tables[layer, seq, head, at // bs])
                assert int(plan.slots[layer, head, n]) == block * bs + at % bs
    assert plan.positions.tolist() == [5, 3] and plan.token_seq_index.tolist() == [0, 1]
    assert (max(plan.seq_max_lens), min(plan.seq_min_lens)) == (6, 3)
    assert torch.equal(cache.context_lens[:, [a, b]], before[:, [a, b]] + 1)
