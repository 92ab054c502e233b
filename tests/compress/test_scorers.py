"""Scorers: each ranks KVs its own way, and the same block-aligned planner frees real blocks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcompress.cache import CacheConfig, PagedKVCache
from kvcompress.compress import (
    SCORERS,
    CompressionParams,
    Compressor,
    MetricConfig,
    ScorerInputs,
    expected_attention,
    last_query_attention,
    pool_by_position,
    queries_seen,
)
from kvcompress.compress.scorers.attention import Pooling
from kvcompress.errors import InvalidParameterError
from tests.compress.reference_planner import head_contents, queries_counted

LAYERS, HEADS, DIM, BS = 2, 2, 4, 4


def make_cache(length: int, *, seed: int = 0, block_size: int = BS):
    cfg = CacheConfig(
        num_layers=LAYERS,
        num_kv_heads=HEADS,
        head_dim=DIM,
        block_size=block_size,
        kv_cache_memory=400 * block_size * (2 * DIM * 4 + 8),
        dtype=torch.float32,
        max_seqs=4,
        max_model_len=512,
    )
    cache = PagedKVCache(cfg)
    slot = cache.allocate_seq()
    plan = cache.prepare_append(torch.tensor([slot]), torch.tensor([length]))
    gen = torch.Generator().manual_seed(seed)
    for layer in range(LAYERS):
        k = torch.randn(length, HEADS, DIM, generator=gen)
        cache.write(layer, plan.slots[layer], k, torch.randn(length, HEADS, DIM, generator=gen))
    cache.metric.view(-1)[plan.slots.reshape(-1)] = torch.rand(plan.slots.numel(), generator=gen)
    return cache, slot


def keys_of(cache, slot, layer, head):
    """{position: key} of one head, through the block tables."""
    out = {}
    for i, pos, _ in head_contents(cache, slot, layer, head):
        block = int(cache.block_tables[layer, slot, head, i // cache.block_size])
        out[pos] = cache.k_pool[block, i % cache.block_size].clone()
    return out


# --- the "avg" divisor ----------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    prefill=st.integers(1, 40),
    decoded=st.integers(0, 10),
    window=st.integers(1, 48),
    buffer=st.integers(0, 5),
    data=st.data(),
)
def test_queries_seen_counts_exactly_the_queries_that_added(prefill, decoded, window, buffer, data):
    seq_len = prefill + decoded
    pos = data.draw(st.integers(0, seq_len - 1))
    got = queries_seen(
        torch.tensor(pos),
        torch.tensor(seq_len),
        torch.tensor(prefill),
        torch.tensor(window),
        torch.tensor(buffer),
    )
    assert int(got) == queries_counted(pos, seq_len, prefill, window, buffer)


def test_avg_divides_by_the_window_not_by_every_later_query():
    cache, slot = make_cache(100)
    view = cache.head_view(torch.tensor([slot]))
    params = [CompressionParams(metric="l2-avg", protected_window=0)]
    comp = Compressor(cache)
    # The prefill ended at 90 tokens; 10 decode steps collected since.
    inputs = ScorerInputs(prefill_lens=torch.tensor([90]))
    scores = comp.scores(torch.tensor([slot]), view, params, inputs)
    for i, pos, metric in head_contents(cache, slot, 1, 0):
        # 32 window queries saw every prompt KV up to position 58; then the 10 decode steps.
        expected = 32 + 10 if pos <= 58 else (90 - pos) + 10 if pos < 90 else 100 - pos
        assert scores[0, HEADS, i].item() == pytest.approx(metric / expected)


def test_avg_divisor_follows_each_requests_own_window_and_buffer():
    """One pass, two sequences: each divides by the queries ITS settings let add; a request
    that gives none uses the compressor's engine-wide MetricConfig."""
    cache, a = make_cache(100)
    b = cache.allocate_seq()
    plan = cache.prepare_append(torch.tensor([b]), torch.tensor([100]))
    cache.metric.view(-1)[plan.slots.reshape(-1)] = 1.0
    params = [
        CompressionParams(metric="l1-avg", protected_window=0, window_size=8, collection_buffer=2),
        CompressionParams(metric="l1-avg", protected_window=0),
    ]
    comp = Compressor(cache, metric_config=MetricConfig(window_size=16))
    view = cache.head_view(torch.tensor([a, b]))
    scores = comp.scores(torch.tensor([a, b]), view, params)
    for row, (slot, w, buffer) in enumerate([(a, 8, 2), (b, 16, 0)]):
        for i, pos, metric in head_contents(cache, slot, 0, 1):
            seen = queries_counted(pos, 100, 100, w, buffer)
            expected = metric / max(seen, 1)
            assert scores[row, 1, i].item() == pytest.approx(expected)


# --- the rule: which scorer ranks a request ---------------------------------------------------


def test_scorer_overrides_attention_policies_but_not_streaming_or_random():
    assert CompressionParams().effective_scorer == "window"
    assert CompressionParams("uniform", scorer="key-norm").effective_scorer == "key-norm"
    assert CompressionParams("h2o", scorer="expected-attention").uses_metric is False
    assert CompressionParams("streaming", scorer="key-norm").effective_scorer == "position"
    assert CompressionParams("random", scorer="window").effective_scorer == "random"
    assert CompressionParams().uses_metric and not CompressionParams(scorer="key-norm").uses_metric
    with pytest.raises(InvalidParameterError) as info:
        CompressionParams(scorer="snapkv")
    assert info.value.param == "scorer"
    assert {s.name for s in SCORERS.values() if s.query_agnostic} >= {
        "key-norm",
        "expected-attention",
    }


# --- each scorer, through the same planner -------------------------------------------------


@pytest.mark.parametrize("scorer", list(SCORERS))
@pytest.mark.parametrize("policy", ["kvcompress", "uniform"])
def test_every_scorer_frees_exactly_the_budgeted_blocks(scorer, policy):
    cache, slot = make_cache(61)
    before = cache.pool.num_used
    params = CompressionParams(policy, max_cache_tokens=16, protected_window=4, scorer=scorer)
    gen = torch.Generator().manual_seed(1)
    inputs = ScorerInputs(
        **{
            name: torch.randn(1, LAYERS, HEADS, DIM, generator=gen).abs()
            for name in SCORERS[scorer].requires
        }
    )
    stats = Compressor(cache).compress([slot], [params], inputs)
    allowed = math.ceil(16 * LAYERS * HEADS / BS)
    assert cache.blocks_held(slot) == allowed == cache.pool.num_used
    assert stats.blocks_freed == before - allowed
    assert cache.audit().ok
    if policy == "uniform":
        assert cache.context_lens[:, slot].flatten().tolist() == [16] * (LAYERS * HEADS)


def test_key_norm_evicts_the_largest_keys_first():
    cache, slot = make_cache(40, seed=3)
    norms_before = {
        (layer, head): {p: float(k.norm()) for p, k in keys_of(cache, slot, layer, head).items()}
        for layer in range(LAYERS)
        for head in range(HEADS)
    }
    params = CompressionParams(
        "uniform", max_cache_tokens=12, protected_window=0, scorer="key-norm"
    )
    Compressor(cache).compress([slot], [params])
    for (layer, head), norms in norms_before.items():
        kept = set(keys_of(cache, slot, layer, head))
        assert kept == set(sorted(norms, key=norms.get)[:12])


def test_last_query_attention_matches_a_per_head_softmax():
    gen = torch.Generator().manual_seed(1)
    S, L, H, G, W, D = 2, 2, 2, 3, 5, 4
    q = torch.randn(S, L, H * G, D, generator=gen)
    keys = torch.randn(S, L * H, W, D, generator=gen)
    valid = (
        torch.arange(W).expand(S, L * H, W) < torch.tensor([[5, 3, 1, 4], [2, 5, 5, 0]])[..., None]
    )
    got = last_query_attention(q, keys, valid, 0.5)
    for s in range(S):
        for layer in range(L):
            for h in range(H):
                r = layer * H + h
                n = int(valid[s, r].sum())
                want = torch.zeros(W)
                for g in range(G):
                    logits = keys[s, r, :n] @ q[s, layer, h * G + g] * 0.5
                    want[:n] += torch.softmax(logits, dim=0)
                torch.testing.assert_close(got[s, r], want)


def test_last_query_attention_is_pooled_per_query_head_before_the_group_sum():
    gen = torch.Generator().manual_seed(4)
    S, L, H, G, W, D = 2, 1, 2, 2, 9, 4
    q = torch.randn(S, L, H * G, D, generator=gen)
    keys = torch.randn(S, L * H, W, D, generator=gen)
    valid = torch.arange(W).expand(S, L * H, W) < torch.tensor([[9, 6], [4, 9]])[..., None]
    # Compacted heads: positions are sparse and out of order.
    positions = torch.stack([torch.randperm(30, generator=gen)[:W] for _ in range(S * H)])
    positions = positions.view(S, L * H, W)
    kernels = torch.tensor([5, 1])
    got = last_query_attention(q, keys, valid, 0.5, Pooling(positions, kernels))
    logits = torch.matmul(q.view(S, H, G, D), keys.transpose(-1, -2)) * 0.5
    probs = torch.softmax(logits.masked_fill(~valid.unsqueeze(2), float("-inf")), dim=-1)
    for s in range(S):
        pooled = pool_by_position(probs[s], positions[s], valid[s], int(kernels[s]))
        torch.testing.assert_close(got[s], pooled.sum(dim=1))
    # Kernel 1 is no pooling at all.
    torch.testing.assert_close(got[1], last_query_attention(q, keys, valid, 0.5)[1])
    # One kernel for the whole pass (pooled in one go), on compacted and on in-order heads.
    in_order = torch.arange(W).expand(S, L * H, W)
    for pos in (positions, in_order):
        got = last_query_attention(q, keys, valid, 0.5, Pooling(pos, torch.tensor([5, 5])))
        for s in range(S):
            pooled = pool_by_position(probs[s], pos[s], valid[s], 5)
            torch.testing.assert_close(got[s], pooled.sum(dim=1))
    # Then over spans, for the sequences that pool over them (each its own spans), and
    # one kernel with and without spans in one pass.
    starts = torch.rand(S, 30, generator=gen) < 0.3
    starts[:, 0] = True
    spans = torch.cummax(torch.where(starts, torch.arange(30), 0), dim=1).values
    for by_span in ([True, False], [True, True]):
        pooling = Pooling(positions, torch.tensor([5, 5]), torch.tensor(by_span), spans)
        got = last_query_attention(q, keys, valid, 0.5, pooling)
        for s in range(S):
            own = spans[s].expand(L * H, -1) if by_span[s] else None
            pooled = pool_by_position(probs[s], positions[s], valid[s], 5, own)
            torch.testing.assert_close(got[s], pooled.sum(dim=1))
        assert not torch.allclose(
            got[0],
            last_query_attention(q, keys, valid, 0.5, Pooling(positions, torch.tensor([5, 5])))[0],
        )


def test_last_query_keeps_the_neighbours_of_what_it_attends_within_the_pool_kernel():
    """A fact spans several tokens and the query attends to one of them: pooling keeps the
    rest (here positions 5 to 9 around the attended 7, kernel 5), under the global policy."""
    cache, slot = make_cache(40, seed=5)
    q = torch.zeros(1, LAYERS, HEADS, DIM)
    for layer in range(LAYERS):
        for head in range(HEADS):
            # Position 7 is slot 7 before any compaction; its long key takes the attention.
            block = int(cache.block_tables[layer, slot, head, 7 // BS])
            cache.k_pool[block, 7 % BS] *= 10
            q[0, layer, head] = cache.k_pool[block, 7 % BS]
    params = CompressionParams(
        max_cache_tokens=8, protected_window=0, scorer="last-query", pool_kernel=5
    )
    Compressor(cache).compress([slot], [params], ScorerInputs(last_queries=q))
    for layer in range(LAYERS):
        for head in range(HEADS):
            assert set(range(5, 10)) <= set(keys_of(cache, slot, layer, head))


def test_key_norm_budgets_do_not_follow_a_layers_key_scale():
    """Layers' key norms differ in scale; the global selection must not hand one layer's
    budget to another for that alone: scaling every key of layer 0 by 10 changes nothing."""
    kept = []
    for scale in (1.0, 10.0):
        cache, slot = make_cache(61, seed=8)
        # Layer 1 head 1 holds a few unusually short keys: the selection should notice.
        block = int(cache.block_tables[1, slot, 1, 0])
        cache.k_pool[block] *= 0.01
        blocks = cache.block_tables[0, slot].flatten()
        cache.k_pool[blocks[blocks >= 0]] *= scale
        params = CompressionParams(max_cache_tokens=16, protected_window=4, scorer="key-norm")
        Compressor(cache).compress([slot], [params])
        kept.append(cache.context_lens[:, slot].flatten().tolist())
    assert kept[0] == kept[1]
    assert len(set(kept[0])) > 1  # the global selection did vary the budgets


def test_last_query_keeps_what_the_query_attends_and_needs_the_query():
    cache, slot = make_cache(40, seed=5)
    params = CompressionParams(
        "uniform", max_cache_tokens=8, protected_window=0, scorer="last-query", pool_kernel=1
    )
    with pytest.raises(InvalidParameterError, match="last_queries"):
        Compressor(cache).compress([slot], [params])
    assert cache.context_lens[:, slot].flatten().tolist() == [40] * (LAYERS * HEADS)  # untouched
    # A query equal to a large multiple of the key at position 7 of every head attends
    # (almost) only there: that KV must survive everywhere.
    q = torch.zeros(1, LAYERS, HEADS, DIM)
    for layer in range(LAYERS):
        for head in range(HEADS):
            q[0, layer, head] = 50 * keys_of(cache, slot, layer, head)[7]
    Compressor(cache).compress([slot], [params], ScorerInputs(last_queries=q))
    for layer in range(LAYERS):
        for head in range(HEADS):
            assert 7 in keys_of(cache, slot, layer, head)


def test_expected_attention_is_last_query_attention_for_a_point_estimate():
    gen = torch.Generator().manual_seed(2)
    mean = torch.randn(1, 4, 2, 3, generator=gen)  # [S, LH, G, D]
    keys = torch.randn(1, 4, 6, 3, generator=gen)
    valid = torch.ones(1, 4, 6, dtype=torch.bool)
    point = expected_attention(mean, None, keys, valid, 0.7)
    as_query = last_query_attention(mean.view(1, 2, 4, 3), keys, valid, 0.7)
    torch.testing.assert_close(point, as_query)
    # Variance adds s^2/2 * sum(var * k^2) to each logit: with var only on dimension 0 the
    # key with the largest |k_0| gains the most.
    var = torch.zeros_like(mean)
    var[..., 0] = 4.0
    spread = expected_attention(torch.zeros_like(mean), var, keys, valid, 0.7)
    assert torch.equal(spread.argmax(-1), (keys[..., 0] ** 2).argmax(-1))


def test_expected_attention_needs_the_mean_query():
    cache, slot = make_cache(40, seed=7)
    params = CompressionParams(max_cache_tokens=8, scorer="expected-attention")
    with pytest.raises(InvalidParameterError, match="query_mean"):
        Compressor(cache).compress([slot], [params])
    assert cache.context_lens[:, slot].flatten().tolist() == [40] * (LAYERS * HEADS)


def test_expected_attention_uses_given_query_statistics():
    cache, slot = make_cache(40, seed=7)
    params = CompressionParams(
        "uniform",
        max_cache_tokens=8,
        protected_window=0,
        scorer="expected-attention",
        pool_kernel=1,
    )
    mean = torch.zeros(1, LAYERS, HEADS, DIM)
    for layer in range(LAYERS):
        for head in range(HEADS):
            mean[0, layer, head] = 50 * keys_of(cache, slot, layer, head)[11]
    Compressor(cache).compress([slot], [params], ScorerInputs(query_mean=mean))
    for layer in range(LAYERS):
        for head in range(HEADS):
            assert 11 in keys_of(cache, slot, layer, head)


def test_expected_attention_shares_the_global_budget_by_standing_not_by_sharpness():
    """A mean query of a larger norm concentrates its head's expected attention on fewer KVs;
    as probabilities that head's tail would then lose the global selection to flatter heads.
    Standardised log-attention ranks a head's KVs by how they stand out within it, so how
    sharp each head is decides nothing: the same KVs are kept."""
    params = CompressionParams(
        max_cache_tokens=12, protected_window=0, scorer="expected-attention", pool_kernel=1
    )
    mean = torch.randn(1, LAYERS, HEADS, DIM, generator=torch.Generator().manual_seed(4))
    mean[0, 1, 0] = 0  # a head that prefers no KV: none stands out, the others take its share
    sharper = mean * torch.tensor([1.0, 8.0]).view(1, 1, HEADS, 1)
    kept = []
    for query in (mean, sharper):
        cache, slot = make_cache(40, seed=7)
        Compressor(cache).compress([slot], [params], ScorerInputs(query_mean=query))
        kept.append(
            {
                (lay, h): sorted(keys_of(cache, slot, lay, h))
                for lay in range(LAYERS)
                for h in range(HEADS)
            }
        )
    assert kept[0] == kept[1]
    # Still a global selection: the heads keep different numbers of KVs.
    assert len({len(positions) for positions in kept[0].values()}) > 1


def test_the_key_scorers_read_narrow_pools_keys_widened_and_fp8_scaled_back():
    """fp8 pools store keys divided by a per-(layer, head) scale: the scorers must see the
    keys themselves (last-query's softmax temperature depends on their scale). bfloat16 and
    fp8 keys are widened to float32 first."""
    from kvcompress.cache.quant import FP8

    gen = torch.Generator().manual_seed(9)
    keys = {}
    for dtype in (torch.float32, torch.bfloat16, FP8):
        cfg = CacheConfig(
            num_layers=LAYERS,
            num_kv_heads=HEADS,
            head_dim=DIM,
            block_size=BS,
            kv_cache_memory=1 << 20,
            dtype=dtype,
            max_seqs=2,
            max_model_len=64,
        )
        cache = PagedKVCache(cfg)
        slot = cache.allocate_seq()
        plan = cache.prepare_append(torch.tensor([slot]), torch.tensor([12]))
        for layer in range(LAYERS):
            k = 0.5 * (layer + 1) * torch.randn(12, HEADS, DIM, generator=gen.manual_seed(layer))
            cache.write(layer, plan.slots[layer], k, k)
        seq = torch.tensor([slot])
        comp = Compressor(cache)
        view = cache.head_view(seq)
        q = torch.randn(1, LAYERS, HEADS, DIM, generator=gen.manual_seed(99))
        params = [
            CompressionParams(
                max_cache_tokens=4, protected_window=0, scorer="last-query", pool_kernel=1
            )
        ]
        keys[dtype] = comp.scores(seq, view, params, ScorerInputs(last_queries=q))
    finite = torch.isfinite(keys[torch.float32])
    assert int(finite.sum()) == LAYERS * HEADS * 12
    for dtype in (torch.bfloat16, FP8):
        got, want = keys[dtype][finite], keys[torch.float32][finite]
        torch.testing.assert_close(got, want, atol=0.05, rtol=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn])
def test_key_norm_scores_the_same_whether_the_pool_is_read_in_place_or_gathered(dtype):
    """A pass holding most of the pool takes the norms of the whole pool in place, a small
    pass gathers its keys first: the same keys score the same either way."""
    gen = torch.Generator().manual_seed(3)
    keys = [(layer + 1) * torch.randn(37, HEADS, DIM, generator=gen) for layer in range(LAYERS)]
    per_kv = 2 * DIM * dtype.itemsize + 8
    scores = []
    for pool_blocks in (40, 400):  # 37 tokens: 10 blocks per (layer, head), 40 in all
        cfg = CacheConfig(
            num_layers=LAYERS,
            num_kv_heads=HEADS,
            head_dim=DIM,
            block_size=BS,
            kv_cache_memory=pool_blocks * BS * per_kv,
            dtype=dtype,
            max_seqs=1,
            max_model_len=40,
        )
        cache = PagedKVCache(cfg)
        assert cache.k_pool.shape[0] == pool_blocks
        slot = cache.allocate_seq()
        plan = cache.prepare_append(torch.tensor([slot]), torch.tensor([37]))
        for layer in range(LAYERS):
            cache.write(layer, plan.slots[layer], keys[layer], keys[layer])
        seq = torch.tensor([slot])
        params = [CompressionParams(max_cache_tokens=8, protected_window=0, scorer="key-norm")]
        scores.append(Compressor(cache).scores(seq, cache.head_view(seq), params))
    torch.testing.assert_close(scores[0], scores[1])


def test_a_reused_key_buffer_scores_each_pass_as_a_fresh_one():
    """The key scorers gather into the compressor's reused buffer: a pass after a larger one
    (a stale, longer buffer) scores exactly as a compressor that never ran before."""
    cache, long_slot = make_cache(37, seed=4)
    short_slot = cache.allocate_seq()
    plan = cache.prepare_append(torch.tensor([short_slot]), torch.tensor([9]))
    gen = torch.Generator().manual_seed(5)
    for layer in range(LAYERS):
        k = torch.randn(9, HEADS, DIM, generator=gen)
        cache.write(layer, plan.slots[layer], k, k)
    q = torch.randn(1, LAYERS, HEADS, DIM, generator=gen)
    params = [CompressionParams(max_cache_tokens=4, protected_window=0, scorer="last-query")]
    inputs = ScorerInputs(last_queries=q)

    def scores(comp: Compressor, slot: int) -> torch.Tensor:
        seq = torch.tensor([slot])
        return comp.scores(seq, cache.head_view(seq), params, inputs).clone()

    reused = Compressor(cache)
    scores(reused, long_slot)
    torch.testing.assert_close(scores(reused, short_slot), scores(Compressor(cache), short_slot))


def test_last_query_with_pool_spans_keeps_the_whole_span_of_what_it_attends():
    """The query attends to position 7 alone; positions 5 to 9 are one span (a number of
    five tokens): with ``pool_spans`` every head keeps all five, without a pool along
    positions (kernel 1). A caller that gives no spans is refused, the cache untouched."""
    cache, slot = make_cache(40, seed=5)
    params = CompressionParams(
        "uniform",
        max_cache_tokens=8,
        protected_window=0,
        scorer="last-query",
        pool_kernel=1,
        pool_spans=True,
    )
    q = torch.zeros(1, LAYERS, HEADS, DIM)
    for layer in range(LAYERS):
        for head in range(HEADS):
            q[0, layer, head] = 50 * keys_of(cache, slot, layer, head)[7]
    with pytest.raises(InvalidParameterError, match="spans") as info:
        Compressor(cache).compress([slot], [params], ScorerInputs(last_queries=q))
    assert info.value.param == "pool_spans"
    assert cache.context_lens[:, slot].flatten().tolist() == [40] * (LAYERS * HEADS)
    spans = torch.arange(40)
    spans[5:10] = 5
    inputs = ScorerInputs(last_queries=q, spans=spans.view(1, 40))
    Compressor(cache).compress([slot], [params], inputs)
    for layer in range(LAYERS):
        for head in range(HEADS):
            kept = keys_of(cache, slot, layer, head)
            assert all(p in kept for p in range(5, 10)), (layer, head, kept)
