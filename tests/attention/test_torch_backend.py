"""The torch backend against plain-torch references computed from the pools and block tables.

Each check would fail on a plausible bug: a metric written to another head's or sequence's
slots, the window taken from the wrong end of a prompt, probabilities not squared or not
summed over the GQA group, a sequence that does not collect accumulating anyway, or a decode
that attends to slots past a head's length (stale KVs left behind by a compaction).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from kvcompress.attention import AttentionMetadata, TorchAttentionBackend
from kvcompress.attention.metadata import build_metadata
from kvcompress.cache import CacheConfig, PagedKVCache
from kvcompress.compress import CompressionParams, Compressor, MetricConfig, window_metric

L, H, HQ, D, BS = 2, 2, 4, 8, 4  # GQA: two query heads per KV head
G = HQ // H
ATOL = 1e-5


def make_cache(blocks: int = 256) -> PagedKVCache:
    cfg = CacheConfig(
        num_layers=L,
        num_kv_heads=H,
        head_dim=D,
        block_size=BS,
        kv_cache_memory=blocks * BS * (2 * D * 4 + 8),
        max_seqs=8,
        max_model_len=128,
    )
    return PagedKVCache(cfg)


def _meta(
    cache: PagedKVCache,
    seq_slots: list[int],
    counts: list[int],
    is_prefill: bool,
    powers: list[int],
    collect: list[bool],
    metrics: list[MetricConfig] | None = None,
) -> AttentionMetadata:
    """Append room for the step and build its metadata as ``ModelRunner.run`` does;
    ``metrics[i]``: how sequence i collects its metric.

    The ONE place these tests build metadata: if ``AttentionMetadata`` changes, adapt here.
    """
    slots = torch.tensor(seq_slots, dtype=torch.long)
    plan = cache.prepare_append(slots, torch.tensor(counts))
    return build_metadata(
        cache,
        seq_slots=slots,
        append=plan,
        query_lens=list(counts),
        num_decode=0 if is_prefill else len(seq_slots),
        computed=[0] * len(seq_slots),
        metric_powers=[p if c else 0 for p, c in zip(powers, collect, strict=True)],
        metric_settings=metrics,
    )


def held_slots(cache: PagedKVCache, layer: int, slot: int, head: int) -> torch.Tensor:
    """Flat slot ids of a head's held KVs, read from its block-table row and length."""
    n = int(cache.context_lens[layer, slot, head])
    blocks = cache.block_tables[layer, slot, head, : -(-n // BS)]
    return (blocks.view(-1, 1) * BS + torch.arange(BS)).reshape(-1)[:n]


def fill(cache: PagedKVCache, lengths: list[int], gen: torch.Generator) -> tuple[list[int], dict]:
    """Sequences with random K, V and metric; ``keys[(slot, layer, head, pos)] = (k, v)``."""
    slots = [cache.allocate_seq() for _ in lengths]
    plan = cache.prepare_append(torch.tensor(slots), torch.tensor(lengths))
    n = plan.positions.numel()
    keys = {}
    for layer in range(L):
        k, v = torch.randn(2, n, H, D, generator=gen)
        cache.write(layer, plan.slots[layer], k, v)
        for t in range(n):
            s, pos = slots[int(plan.token_seq_index[t])], int(plan.positions[t])
            for h in range(H):
                keys[(s, layer, h, pos)] = (k[t, h], v[t, h])
    cache.metric.view(-1)[plan.slots.reshape(-1)] = torch.rand(plan.slots.numel(), generator=gen)
    return slots, keys


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """One query ``[D]`` over keys ``[n, D]``: (output, probabilities)."""
    p = torch.softmax(k @ q * D**-0.5, dim=0)
    return p @ v, p


# --------------------------------------------------------------------------- prefill
SETTINGS = MetricConfig(window_size=3, pool_kernel=3)
# Another request's settings: a wider window and pooling, a collection buffer.
OTHER_SETTINGS = MetricConfig(window_size=4, pool_kernel=5, collection_buffer=1)


@pytest.mark.parametrize(("collect", "powers"), [([True, True], [2, 1]), ([False, True], [2, 2])])
@pytest.mark.parametrize("lens", [[7, 5], [6, 6]], ids=["ragged", "equal"])
@pytest.mark.parametrize(
    "configs", [[SETTINGS, SETTINGS], [SETTINGS, OTHER_SETTINGS]], ids=["same", "mixed"]
)
def test_prefill_writes_the_window_metric_into_each_heads_own_slots(collect, powers, lens, configs):
    """Each sequence gets the metric of its own settings, as if it ran alone (mixed)."""
    gen = torch.Generator().manual_seed(0)
    cache = make_cache()
    backend = TorchAttentionBackend(cache)
    fill(cache, [6], gen)  # a resident sequence whose slots must stay as they are
    cache.metric.view(-1)[:] = torch.rand(cache.metric.numel(), generator=gen)
    a, b = cache.allocate_seq(), cache.allocate_seq()
    meta = _meta(cache, [a, b], lens, True, powers, collect, configs)
    slots = meta.append.slots
    for layer in range(L):
        expected = cache.metric.clone()
        q = torch.randn(12, HQ, D, generator=gen)
        k, v = torch.randn(2, 12, H, D, generator=gen)
        out = backend.forward(layer, q, k, v, meta)
        start = 0
        for i, n in enumerate(lens):
            end = start + n
            qs, ks, vs = q[start:end], k[start:end], v[start:end]
            if collect[i]:
                w = min(configs[i].window_size, n)
                m = window_metric(qs[n - w :].transpose(0, 1), ks, D**-0.5, powers[i], configs[i])
                expected.view(-1)[slots[layer, :, start:end].reshape(-1)] = m.reshape(-1)
            # Output: causal attention within the sequence, each query head on its KV head.
            for t in range(n):
                for hq in range(HQ):
                    o, _ = attend(qs[t, hq], ks[: t + 1, hq // G], vs[: t + 1, hq // G])
                    torch.testing.assert_close(out[start + t, hq], o, atol=ATOL, rtol=0)
            start = end
        torch.testing.assert_close(cache.metric, expected, atol=ATOL, rtol=0)
        for h in range(H):  # K and V landed in each head's slots
            assert torch.equal(cache.k_pool.view(-1, D)[slots[layer, h]], k[:, h])
            assert torch.equal(cache.v_pool.view(-1, D)[slots[layer, h]], v[:, h])
    # The non-collecting sequence's new KVs keep the zero metric of a fresh append.
    for i, n in enumerate(lens):
        first = sum(lens[:i])
        new = cache.metric.view(-1)[slots[:, :, first : first + n].reshape(-1)]
        assert bool((new != 0).any()) == collect[i]


# --------------------------------------------------------------------------- decode
def reference_decode(cache, meta, layer, q, k_new, v_new, pool_k, pool_v, buffers):
    """Output ``[B, HQ, D]`` and the metric every held KV gains, as {flat slot: value}."""
    out = torch.empty(len(meta.query_lens), HQ, D)
    gained: dict[int, float] = {}
    for b, s in enumerate(meta.seq_slots.tolist()):
        current = int(meta.append.positions[b])
        for h in range(H):
            flat = held_slots(cache, layer, s, h)
            # Old KVs from the pool as it was before the step; the newest is the step's own.
            keys = torch.cat([pool_k[flat[:-1]], k_new[b, h : h + 1]])
            values = torch.cat([pool_v[flat[:-1]], v_new[b, h : h + 1]])
            contrib = torch.zeros(flat.numel())
            for g in range(G):
                out[b, h * G + g], p = attend(q[b, h * G + g], keys, values)
                contrib += p ** int(meta.decode.metric_power[b])
            if meta.decode.metric_power[b] > 0:
                pos = cache.position.view(-1)[flat].long()
                contrib[(current - pos) < buffers[b]] = 0
                for f, c in zip(flat.tolist(), contrib.tolist(), strict=True):
                    gained[f] = c
    return out, gained


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize(
    ("collect", "powers", "buffers"),
    [
        ([True, False, True], [2, 2, 1], [0, 0, 0]),
        ([False, True, True], [1, 2, 2], [3, 3, 3]),
        ([True, True, True], [2, 1, 2], [0, 3, 5]),  # each sequence its own buffer
        ([False, False, False], [2, 2, 2], [0, 0, 0]),  # the fused path: no probabilities
    ],
)
def test_decode_adds_each_steps_probabilities_to_exactly_the_attended_slots(
    compressed, collect, powers, buffers
):
    gen = torch.Generator().manual_seed(1)
    cache = make_cache()
    backend = TorchAttentionBackend(cache)
    slots, _ = fill(cache, [9, 17, 4], gen)
    if compressed:  # heads of different lengths, stale KVs past them
        Compressor(cache).compress(
            slots,
            [CompressionParams(compression_rate=3.0, protected_window=2, min_cache_tokens=0)] * 3,
        )
    metrics = [MetricConfig(collection_buffer=b) for b in buffers]
    meta = _meta(cache, slots, [1, 1, 1], False, powers, collect, metrics)
    for layer in range(L):
        before = cache.metric.clone()
        pool_k, pool_v = cache.k_pool.view(-1, D).clone(), cache.v_pool.view(-1, D).clone()
        q = torch.randn(3, HQ, D, generator=gen)
        k, v = torch.randn(2, 3, H, D, generator=gen)
        out = backend.forward(layer, q, k, v, meta)
        ref_out, gained = reference_decode(cache, meta, layer, q, k, v, pool_k, pool_v, buffers)
        torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)
        expected = before.view(-1).clone()
        for f, c in gained.items():
            expected[f] += c
        torch.testing.assert_close(cache.metric.view(-1), expected, atol=ATOL, rtol=0)
        assert bool((cache.metric != before).any()) == any(collect)


# --------------------------------------------------------------------------- after compaction
@pytest.mark.parametrize("collect", [True, False])
def test_decode_after_compaction_attends_to_exactly_the_kept_kvs(collect):
    """Expected K and V come from what was written per token position, not from the pools."""
    gen = torch.Generator().manual_seed(2)
    cache = make_cache()
    backend = TorchAttentionBackend(cache)
    slots, keys = fill(cache, [13, 22], gen)
    protected = 3
    params = CompressionParams(compression_rate=2.5, protected_window=protected, min_cache_tokens=0)
    for s, h in itertools.product(slots, range(H)):  # layer 0 matters most: it keeps more
        cache.metric.view(-1)[held_slots(cache, 0, s, h)] += 10.0
    stats = Compressor(cache).compress(slots, [params, params])
    assert stats.kvs_evicted > 0
    assert len(set(cache.context_lens[:, slots].reshape(-1).tolist())) > 1  # ragged heads
    meta = _meta(cache, slots, [1, 1], False, [2, 2], [collect, collect])
    # Each layer gathers its own widest head's blocks, not the batch's widest overall.
    widest = cache.context_lens[:, slots].amax(dim=(1, 2))
    assert list(meta.decode.layer_blocks) == (-(-widest // cache.block_size)).tolist()
    assert len(set(meta.decode.layer_blocks)) > 1
    for layer in range(L):
        q = torch.randn(2, HQ, D, generator=gen)
        k, v = torch.randn(2, 2, H, D, generator=gen)
        out = backend.forward(layer, q, k, v, meta)
        for b, s in enumerate(slots):
            seq_len = int(cache.seq_lens[s])
            for h in range(H):
                kept = cache.position.view(-1)[held_slots(cache, layer, s, h)].tolist()
                assert len(set(kept)) == len(kept) == int(cache.context_lens[layer, s, h])
                assert set(range(seq_len - 1 - protected, seq_len)) <= set(kept)
                old = [p for p in kept if p != seq_len - 1]
                rows_k = torch.stack([keys[(s, layer, h, p)][0] for p in old] + [k[b, h]])
                rows_v = torch.stack([keys[(s, layer, h, p)][1] for p in old] + [v[b, h]])
                every_k = torch.stack([keys[(s, layer, h, p)][0] for p in range(seq_len - 1)])
                every_v = torch.stack([keys[(s, layer, h, p)][1] for p in range(seq_len - 1)])
                for g in range(G):
                    hq = h * G + g
                    expected, _ = attend(q[b, hq], rows_k, rows_v)
                    torch.testing.assert_close(out[b, hq], expected, atol=ATOL, rtol=0)
                    if len(old) < seq_len - 1:  # eviction changed this head's answer
                        full, _ = attend(
                            q[b, hq],
                            torch.cat([every_k, k[b, h : h + 1]]),
                            torch.cat([every_v, v[b, h : h + 1]]),
                        )
                        assert not torch.allclose(full, expected, atol=ATOL)


# --------------------------------------------------------------------------- chunks
def reference_chunk(q, k_new, v_new, old_k, old_v, old_pos, start_pos, power, config):
    """One KV head's chunk against the head's older KVs, from first principles.

    ``q [n, G, D]``; ``old_* [m, ...]``. Returns the output ``[n, G, D]``, the older KVs'
    metric after the chunk ``[m]`` and the new KVs' metric ``[n]``: the window's alone (it
    replaces what the older KVs held), max-pooled over every held KV within
    ``pool_kernel // 2`` positions.
    """
    n, m = q.shape[0], old_k.shape[0]
    out = torch.empty(n, G, D)
    for i in range(n):
        keys, values = torch.cat([old_k, k_new[: i + 1]]), torch.cat([old_v, v_new[: i + 1]])
        for g in range(G):
            out[i, g], _ = attend(q[i, g], keys, values)
    w = min(config.window_size, n)
    every_pos = torch.cat([old_pos, start_pos + torch.arange(n)])
    r = config.pool_kernel // 2
    metric = torch.zeros(m + n)
    for g in range(G):
        per_query_head = torch.zeros(m + n)
        for i in range(n - w, n):
            _, p = attend(
                q[i, g], torch.cat([old_k, k_new[: i + 1]]), old_v.new_zeros(m + i + 1, D)
            )
            p = p**power
            key_pos = every_pos[: m + i + 1]
            p = torch.where(start_pos + i - key_pos < config.collection_buffer, 0.0, p)
            per_query_head[: m + i + 1] += p
        for j in range(m + n):
            near = (every_pos - every_pos[j]).abs() <= r
            metric[j] += per_query_head[near].max()
    return out, metric[:m], metric[m:]


CHUNK_SETTINGS = [
    MetricConfig(window_size=3, pool_kernel=3),
    MetricConfig(window_size=8, pool_kernel=1, collection_buffer=2),  # window > chunk
]


@pytest.mark.parametrize("power", [2, 1])
@pytest.mark.parametrize("first", [0, 1], ids=["window-inside-chunk", "window-past-chunk-start"])
def test_chunks_attend_to_each_heads_compressed_kvs_and_themselves_beside_a_decode(power, first):
    """Two chunks with different metric settings in one step: each gets its own metric."""
    gen = torch.Generator().manual_seed(7)
    cache = make_cache()
    backend = TorchAttentionBackend(cache)
    (a, b, c), _ = fill(cache, [5, 17, 12], gen)
    configs = {b: CHUNK_SETTINGS[first], c: CHUNK_SETTINGS[1 - first]}
    # Compress b and c so their heads hold different KVs, not in position order.
    params = CompressionParams(max_cache_tokens=6, protected_window=1, min_cache_tokens=0)
    Compressor(cache).compress([b, c], [params, params])
    lens_b = cache.context_lens[:, b].clone()
    assert len(set(lens_b.view(-1).tolist())) > 1, "heads should hold different counts"
    held_before = {s: int(cache.seq_lens[s]) for s in (b, c)}
    n = {b: 5, c: 4}
    old = {
        (s, layer, h): held_slots(cache, layer, s, h)
        for s in (b, c)
        for layer in range(L)
        for h in range(H)
    }
    cache.metric.uniform_(1.0, 2.0, generator=gen)  # stale metric the windows must replace
    snapshot = (cache.k_pool.clone(), cache.v_pool.clone())
    old_pos = cache.position.clone()
    slots = torch.tensor([a, b, c])
    plan = cache.prepare_append(slots, torch.tensor([1, n[b], n[c]]))
    meta = build_metadata(
        cache,
        seq_slots=slots,
        append=plan,
        query_lens=[1, n[b], n[c]],
        num_decode=1,
        computed=[5, 17, 12],
        metric_powers=[0, power, power],
        metric_settings=[MetricConfig(), configs[b], configs[c]],
    )
    assert all(chunk.history is not None for chunk in meta.chunks) and meta.decode is not None
    pool_k, pool_v = snapshot
    rows = {b: slice(1, 1 + n[b]), c: slice(1 + n[b], 1 + n[b] + n[c])}
    total = 1 + n[b] + n[c]
    for layer in range(L):
        q = torch.randn(total, HQ, D, generator=gen)
        k, v = torch.randn(2, total, H, D, generator=gen)
        out = backend.forward(layer, q, k, v, meta)
        for s in (b, c):
            r = rows[s]
            for h in range(H):
                flat = old[(s, layer, h)]
                got_out, got_old, got_new = reference_chunk(
                    q[r, h * G : (h + 1) * G],
                    k[r, h],
                    v[r, h],
                    pool_k.view(-1, D)[flat],
                    pool_v.view(-1, D)[flat],
                    old_pos.view(-1)[flat],
                    held_before[s],
                    power,
                    configs[s],
                )
                torch.testing.assert_close(
                    out[r, h * G : (h + 1) * G], got_out, atol=ATOL, rtol=1e-5
                )
                torch.testing.assert_close(
                    cache.metric.view(-1)[flat], got_old, atol=ATOL, rtol=1e-5
                )
                new_slots = plan.slots[layer, h, r]
                torch.testing.assert_close(
                    cache.metric.view(-1)[new_slots], got_new, atol=ATOL, rtol=1e-5
                )
        for h in range(H):
            # The decode row attends to its own head's KVs only.
            keys = torch.cat([pool_k.view(-1, D)[held_slots(cache, layer, a, h)[:-1]], k[:1, h]])
            values = torch.cat([pool_v.view(-1, D)[held_slots(cache, layer, a, h)[:-1]], v[:1, h]])
            for g in range(G):
                o, _ = attend(q[0, h * G + g], keys, values)
                torch.testing.assert_close(out[0, h * G + g], o, atol=ATOL, rtol=1e-5)
    assert cache.audit().ok
