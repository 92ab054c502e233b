"""Forked sequences share blocks by reference count; writes copy a shared block first.

Random programs of prefills, forks, decodes, compressions and frees (aborts of parents or
children at any point) are checked after every operation against a plain-Python shadow of
what each (layer, sequence, head) must hold, and the pool's reference counts against a
plain-Python count of the block tables.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kvcompress.cache import OutOfBlocksError, PagedKVCache
from kvcompress.compress import CompressionParams, Compressor
from tests.cache.test_paged_cache import make_cache

LAYERS, HEADS = 2, 2


def evicting(rate: float) -> CompressionParams:
    return CompressionParams(compression_rate=rate, protected_window=1, min_cache_tokens=0, sinks=0)


def key_value(uid: int, pos: int, layer: int, head: int) -> float:
    """What K holds (every dim) for a token: unique per writer, position, layer and head."""
    return float(uid * 100_000 + pos * 100 + layer * 10 + head)


class Shadow:
    """Per live slot: its writer id and, per (layer, head), the K values it must hold."""

    def __init__(self, cache: PagedKVCache, seed: int) -> None:
        self.cache = cache
        self.heads: dict[int, dict[tuple[int, int], list[float]]] = {}
        self.next_uid = 1
        self.uid: dict[int, int] = {}
        self.gen = torch.Generator().manual_seed(seed)

    def append(self, slots: list[int], counts: list[int]) -> None:
        cache = self.cache
        start = [int(cache.seq_lens[s]) for s in slots]
        plan = cache.prepare_append(torch.tensor(slots), torch.tensor(counts))
        owners = [slots[int(i)] for i in plan.token_seq_index]
        positions = plan.positions.tolist()
        for layer in range(LAYERS):
            k = torch.zeros(len(owners), HEADS, cache.head_dim)
            for t, (slot, pos) in enumerate(zip(owners, positions, strict=True)):
                for head in range(HEADS):
                    k[t, head] = key_value(self.uid[slot], pos, layer, head)
                    self.heads[slot][(layer, head)].append(k[t, head, 0].item())
            cache.write(layer, plan.slots[layer], k, k)
        rand = torch.rand(plan.slots.numel(), generator=self.gen)
        cache.metric.view(-1)[plan.slots.reshape(-1)] = rand
        grown = [a + c for a, c in zip(start, counts, strict=True)]
        assert [int(cache.seq_lens[s]) for s in slots] == grown

    def new(self) -> int:
        slot = self.cache.allocate_seq()
        self.uid[slot] = self.next_uid
        self.next_uid += 1
        self.heads[slot] = {(la, h): [] for la in range(LAYERS) for h in range(HEADS)}
        return slot

    def fork(self, src: int) -> int:
        dst = self.cache.fork_seq(src)
        self.uid[dst] = self.next_uid
        self.next_uid += 1
        self.heads[dst] = {key: list(v) for key, v in self.heads[src].items()}
        return dst

    def free(self, slot: int) -> None:
        self.cache.free_seq(slot)
        del self.heads[slot], self.uid[slot]

    def held(self, slot: int, layer: int, head: int) -> list[float]:
        cache = self.cache
        n = int(cache.context_lens[layer, slot, head])
        bs = cache.block_size
        blocks = cache.block_tables[layer, slot, head, : -(-n // bs)]
        return cache.k_pool[blocks].reshape(-1, cache.head_dim)[:n, 0].tolist()

    def after_compress(self, slots: list[int]) -> None:
        """A compressed head keeps a subset of what it held (compaction reorders)."""
        for slot in slots:
            for key, expected in self.heads[slot].items():
                now = self.held(slot, *key)
                assert Counter(now) <= Counter(expected)
                self.heads[slot][key] = now

    def check(self) -> None:
        cache = self.cache
        for slot, heads in self.heads.items():
            for key, expected in heads.items():
                assert sorted(self.held(slot, *key)) == sorted(expected), (slot, key)
        audit = cache.audit()
        assert audit.ok, audit
        # Plain-Python reference counts from the tables.
        counts: Counter[int] = Counter()
        for b in cache.block_tables.reshape(-1).tolist():
            if b >= 0:
                counts[b] += 1
        refcount = cache.pool.refcount.tolist()
        assert all(refcount[b] == counts.get(b, 0) for b in range(cache.num_blocks))
        free = set(cache.pool.free_ids().tolist())
        assert all((b in free) == (counts.get(b, 0) == 0) for b in range(cache.num_blocks))
        assert cache.pool.num_used == len(counts)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 14)),
        st.tuples(st.just("fork"), st.integers(0, 7)),
        st.tuples(st.just("decode"), st.integers(0, 255), st.integers(1, 3)),
        st.tuples(st.just("compress"), st.integers(0, 255), st.sampled_from([1.5, 2.0, 4.0])),
        st.tuples(st.just("free"), st.integers(0, 7)),
    ),
    min_size=4,
    max_size=25,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=ops, blocks=st.sampled_from([24, 48, 96]), seed=st.integers(0, 2**16))
def test_forks_share_and_copy_on_write_keeps_every_sequence_exact(program, blocks, seed):
    cache = make_cache(block_size=4, blocks=blocks, layers=LAYERS, heads=HEADS)
    compressor = Compressor(cache, seed=seed)
    shadow = Shadow(cache, seed)
    evicted_somewhere = False
    for op in program:
        live = sorted(shadow.heads)
        if op[0] == "add" and cache.num_free_seq_slots:
            slot = shadow.new()
            need = cache.blocks_needed(torch.tensor([slot]), torch.tensor([op[1]]))
            if need > cache.num_free_blocks:
                shadow.free(slot)
            else:
                shadow.append([slot], [op[1]])
        elif op[0] == "fork" and live and cache.num_free_seq_slots:
            used = cache.pool.num_used
            shadow.fork(live[op[1] % len(live)])
            assert cache.pool.num_used == used  # sharing allocates nothing
        elif op[0] == "decode" and live:
            chosen = [s for i, s in enumerate(live) if op[1] >> i & 1] or live[:1]
            counts = [op[2]] * len(chosen)
            need = cache.blocks_needed(torch.tensor(chosen), torch.tensor(counts))
            free = cache.num_free_blocks
            if need > free:
                with pytest.raises(OutOfBlocksError):
                    shadow.append(chosen, counts)
            else:
                shadow.append(chosen, counts)
                # Copies whose last reference moved out return at once: never more used.
                assert cache.num_free_blocks >= free - need
        elif op[0] == "compress" and live:
            chosen = [s for i, s in enumerate(live) if op[1] >> i & 1] or live[:1]
            params = [evicting(op[2])] * len(chosen)
            evicted_somewhere |= compressor.compress(chosen, params).kvs_evicted > 0
            shadow.after_compress(chosen)
        elif op[0] == "free" and live:
            shadow.free(live[op[1] % len(live)])
        shadow.check()
    for slot in sorted(shadow.heads):
        shadow.free(slot)
    assert cache.num_free_blocks == cache.num_blocks
    assert int(cache.pool.refcount.sum()) == 0
    event(f"evicted: {evicted_somewhere}")


def test_fork_shares_every_block_and_a_decode_copies_only_partial_tails():
    cache = make_cache(block_size=4, blocks=64, layers=LAYERS, heads=HEADS)
    shadow = Shadow(cache, 0)
    parent = shadow.new()
    shadow.append([parent], [6])  # 2 blocks per head, the second half full
    children = [shadow.fork(parent) for _ in range(3)]
    assert cache.pool.num_used == 8
    assert cache.blocks_held(children[0]) == 8 and cache.blocks_shared(children[0]) == 8
    assert cache.blocks_needed(torch.tensor(children), torch.ones(3, dtype=torch.long)) == 12
    shadow.append(children, [1, 1, 1])
    # Each child copied its 4 partial tails; the parent's stay its own; full ones shared.
    assert cache.pool.num_used == 8 + 12
    assert cache.blocks_shared(children[0]) == 4 and cache.blocks_shared(parent) == 4
    assert cache.held_block_count() == 32 and cache.distinct_block_count() == 20
    shadow.check()
    shadow.free(parent)
    shadow.check()
    for child in children:
        shadow.free(child)
    assert cache.num_free_blocks == cache.num_blocks


def test_compacting_a_child_leaves_its_siblings_intact():
    cache = make_cache(block_size=4, blocks=96, layers=LAYERS, heads=HEADS)
    shadow = Shadow(cache, 1)
    parent = shadow.new()
    shadow.append([parent], [24])
    cache.metric[cache.position < 4] = 10.0  # every head's first block survives whole
    child = shadow.fork(parent)
    stats = Compressor(cache).compress([child], [evicting(4.0)])
    assert stats.kvs_evicted > 0
    shadow.after_compress([child])
    shadow.check()  # the parent still holds all 24 of its keys in every head
    assert cache.blocks_held(parent) == 24
    # Compaction copied only the shared blocks it wrote into; the rest stay shared.
    assert cache.blocks_shared(child) > 0
    assert cache.pool.num_used < 24 + cache.blocks_held(child)


def test_uncounted_sharing_is_a_refcount_mismatch():
    cache = make_cache(block_size=4, blocks=64, layers=LAYERS, heads=HEADS)
    shadow = Shadow(cache, 0)
    a = shadow.new()
    shadow.append([a], [5])
    cache.block_tables[0, a, 1, 1] = cache.block_tables[0, a, 0, 1]
    audit = cache.audit()
    assert audit.refcount_mismatch == 2 and audit.leaked == 1 and not audit.ok
