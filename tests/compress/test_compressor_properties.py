"""Random sequences of appends, compressions and frees keep the cache exactly right."""

from __future__ import annotations

import contextlib

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kvcompress.cache import CacheConfig, OutOfBlocksError, PagedKVCache
from kvcompress.compress import CompressionParams, Compressor
from tests.compress.reference_planner import head_contents, reference_plan

LAYERS, HEADS, DIM = 2, 2, 4

params_strategy = st.builds(
    CompressionParams,
    policy=st.sampled_from(["kvcompress", "uniform", "pyramid", "streaming", "h2o"]),
    compression_rate=st.one_of(st.none(), st.sampled_from([1.0, 1.5, 2.0, 4.0, 8.0, 64.0])),
    protected_window=st.integers(0, 6),
    sinks=st.integers(0, 3),
    min_cache_tokens=st.sampled_from([0, 0, 3, 10]),
    metric=st.sampled_from(["l2-sum", "l1-sum", "l2-avg", "l1-avg"]),
    layer_floor=st.sampled_from([0.0, 0.0, 0.5, 0.75, 1.0]),
).flatmap(
    lambda p: (
        st.just(p)
        if p.compression_rate is not None
        else st.integers(1, 12).map(
            lambda m: CompressionParams(
                policy=p.policy,
                max_cache_tokens=m,
                protected_window=p.protected_window,
                sinks=p.sinks,
                metric=p.metric,
                layer_floor=p.layer_floor,
            )
        )
    )
)

op_strategy = st.one_of(
    st.tuples(st.just("add"), st.integers(1, 40)),
    st.tuples(st.just("decode"), st.integers(1, 3)),
    st.tuples(st.just("compress"), st.lists(params_strategy, min_size=1, max_size=3)),
    st.tuples(st.just("free"), st.integers(0, 7)),
)


class Shadow:
    """What each head should hold: position -> metric."""

    def __init__(self, cache: PagedKVCache, metric_values: list[float], seed: int) -> None:
        self.cache = cache
        self.heads: dict[int, dict[tuple[int, int], dict[int, float]]] = {}
        self.uid: dict[int, int] = {}
        self.next_uid = 1
        self.metric_values = metric_values
        self.gen = torch.Generator().manual_seed(seed)

    def key_of(self, slot, layer, head, pos):
        return torch.tensor([self.uid[slot], layer, head, pos], dtype=torch.float32)

    def append(self, slots: list[int], counts: list[int]) -> None:
        cache = self.cache
        plan = cache.prepare_append(torch.tensor(slots), torch.tensor(counts))
        seq_of_token = [s for s, n in zip(slots, counts, strict=True) for _ in range(n)]
        for layer in range(LAYERS):
            k = torch.stack(
                [
                    torch.stack([self.key_of(s, layer, h, int(p)) for h in range(HEADS)])
                    for s, p in zip(seq_of_token, plan.positions.tolist(), strict=True)
                ]
            )
            cache.write(layer, plan.slots[layer], k, -k)
        pick = torch.randint(len(self.metric_values), plan.slots.shape, generator=self.gen)
        values = torch.tensor(self.metric_values)[pick]
        cache.metric.view(-1)[plan.slots.reshape(-1)] = values.reshape(-1)
        for layer in range(LAYERS):
            for h in range(HEADS):
                for n, (s, p) in enumerate(zip(seq_of_token, plan.positions.tolist(), strict=True)):
                    self.heads[s][(layer, h)][p] = float(values[layer, h, n])

    def check(self) -> None:
        cache = self.cache
        bs = cache.block_size
        used = []
        for s, heads in self.heads.items():
            for (layer, h), expected in heads.items():
                n = int(cache.context_lens[layer, s, h])
                row = cache.block_tables[layer, s, h]
                nb = -(-n // bs)
                assert bool((row[:nb] >= 0).all()) and bool((row[nb:] == -1).all())
                assert nb * bs <= n + bs - 1 or n == 0  # allocated slots <= kept + bs - 1
                used += row[:nb].tolist()
                contents = head_contents(cache, s, layer, h)
                assert {pos: m for _, pos, m in contents} == expected
                for i, pos, _ in contents:
                    block = int(row[i // bs])
                    k = cache.k_pool[block, i % bs]
                    assert torch.equal(k, self.key_of(s, layer, h, pos))
                    assert torch.equal(cache.v_pool[block, i % bs], -k)
        free = cache.pool.free_ids().tolist()
        assert len(set(used)) == len(used), "a block is held twice"
        assert not set(used) & set(free), "a block is both free and in use"
        assert len(used) + len(free) == cache.num_blocks


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    block_size=st.sampled_from([1, 2, 4, 8]),
    metric_values=st.sampled_from(
        [[0.0, 1.0], [0.25, 0.5, 1.0, 2.0, 4.0], [float(i) for i in range(50)]]
    ),
    ops=st.lists(op_strategy, min_size=1, max_size=14),
    seed=st.integers(0, 1000),
)
def test_random_operations_keep_the_cache_exact(block_size, metric_values, ops, seed):
    cfg = CacheConfig(
        num_layers=LAYERS,
        num_kv_heads=HEADS,
        head_dim=DIM,
        block_size=block_size,
        kv_cache_memory=160 * block_size * (2 * DIM * 4 + 8),
        max_seqs=8,
        max_model_len=256,
    )
    cache = PagedKVCache(cfg)
    shadow = Shadow(cache, metric_values, seed)
    compressor = Compressor(cache, max_kvs_per_pass=200)
    live: list[int] = []
    for op, arg in ops:
        if op == "add" and cache.num_free_seq_slots:
            slot = cache.allocate_seq()
            shadow.uid[slot] = shadow.next_uid
            shadow.next_uid += 1
            shadow.heads[slot] = {(layer, h): {} for layer in range(LAYERS) for h in range(HEADS)}
            try:
                shadow.append([slot], [arg])
                live.append(slot)
            except OutOfBlocksError:
                del shadow.heads[slot]
                cache.free_seq(slot)
        elif op == "decode" and live:
            batch = live[:arg]
            with contextlib.suppress(OutOfBlocksError):
                shadow.append(batch, [1] * len(batch))
        elif op == "compress" and live:
            batch = live[: len(arg)]
            params = arg[: len(batch)]
            expected = {}
            for s, p in zip(batch, params, strict=True):
                if p.evicts:
                    expected[s] = reference_plan(cache, s, p)
            before = {
                s: {key: head_contents(cache, s, *key) for key in shadow.heads[s]} for s in batch
            }
            free_before = cache.pool.num_free
            stats = compressor.compress(batch, params)
            assert stats.blocks_freed == sum(f for _, f in expected.values())
            event("compression freed blocks" if stats.blocks_freed else "compression freed none")
            assert cache.pool.num_free == free_before + stats.blocks_freed
            for s, (plan, _) in expected.items():
                for key, evicted in plan.items():
                    gone = {pos for i, pos, _ in before[s][key] if i in evicted}
                    for pos in gone:
                        del shadow.heads[s][key][pos]
        elif op == "free" and live:
            slot = live.pop(arg % len(live))
            cache.free_seq(slot)
            del shadow.heads[slot]
        shadow.check()
    for slot in live:
        cache.free_seq(slot)
    assert cache.pool.num_free == cache.num_blocks
