import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcompress.compress import MetricConfig, decode_metric, pool_by_position, window_metric
from kvcompress.errors import InvalidParameterError


def naive_window_metric(q, k, scale, power, buffer, kernel, spans=None):
    """Loops over heads, window queries and keys, straight from the definition; ``spans``
    (each position's span start) then takes each span's maximum."""
    hq, w, _ = q.shape
    T, hkv, _ = k.shape
    group = hq // hkv
    per_q_head = torch.zeros(hq, T, dtype=torch.float64)
    for h in range(hq):
        for i in range(w):
            qpos = T - w + i
            logits = [float(q[h, i] @ k[j, h // group]) * scale for j in range(qpos + 1)]
            top = max(logits)
            exps = [math.exp(x - top) for x in logits]
            total = sum(exps)
            for j in range(qpos + 1):
                if qpos - j >= buffer:
                    per_q_head[h, j] += (exps[j] / total) ** power
    pooled = per_q_head.clone()
    half = kernel // 2
    for h in range(hq):
        for j in range(T):
            pooled[h, j] = per_q_head[h, max(0, j - half) : j + half + 1].max()
    if spans is not None:
        by_span = pooled.clone()
        for h in range(hq):
            for j in range(T):
                mates = [i for i in range(T) if spans[i] == spans[j]]
                by_span[h, j] = max(pooled[h, i] for i in mates)
        pooled = by_span
    return pooled.view(hkv, group, T).sum(1)


# Span starts of 19 positions: spans of 1, 4, 2, 7, 1, 3 and 1 tokens.
SPANS = [0, 1, 1, 1, 1, 5, 5, 7, 7, 7, 7, 7, 7, 7, 14, 15, 15, 15, 18]


@pytest.mark.parametrize(
    ("power", "buffer", "kernel", "spans"),
    [(2, 0, 7, None), (1, 0, 1, None), (2, 3, 5, None), (2, 0, 3, SPANS), (1, 2, 1, SPANS)],
)
def test_window_metric_matches_definition(power, buffer, kernel, spans):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(4, 5, 8, generator=g)
    k = torch.randn(19, 2, 8, generator=g)
    cfg = MetricConfig(
        window_size=5, collection_buffer=buffer, pool_kernel=kernel, pool_spans=spans is not None
    )
    given_spans = None if spans is None else torch.tensor(spans)
    ours = window_metric(q, k, 8**-0.5, power, cfg, given_spans)
    want = naive_window_metric(q, k, 8**-0.5, power, buffer, kernel, spans)
    assert torch.allclose(ours.double(), want, atol=1e-5)
    if spans is not None:
        # Every position of a span has its span's metric, and the spans matter here.
        for start in set(spans):
            members = [i for i, s in enumerate(spans) if s == start]
            assert (ours[:, members] == ours[:, members[:1]]).all()
        plain = window_metric(q, k, 8**-0.5, power, cfg)
        assert not torch.allclose(plain, ours)


def test_decode_metric_squares_and_sums_the_group():
    probs = torch.tensor([[[0.5, 0.5], [1.0, 0.0]], [[0.5, 0.5], [1.0, 0.0]]])  # B=2, Hq=2, L=2
    out = decode_metric(probs, torch.tensor([2, 1]), num_kv_heads=1)
    assert out.tolist() == [[[1.25, 0.25]], [[1.5, 0.5]]]


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        (dict(window_size=0), "window_size"),
        (dict(pool_kernel=4), "pool_kernel"),
        (dict(pool_kernel=True), "pool_kernel"),
        (dict(collection_buffer=-1), "collection_buffer"),
        (dict(collection_buffer=1.5), "collection_buffer"),
        (dict(pool_spans=0), "pool_spans"),
    ],
)
def test_metric_config_validation_names_the_setting(kwargs, param):
    with pytest.raises(InvalidParameterError) as err:
        MetricConfig(**kwargs)
    assert err.value.param == param


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(1, 24),
    kernel=st.sampled_from([1, 3, 7, 21]),
    seed=st.integers(0, 2**16),
    in_order=st.booleans(),
    by_span=st.booleans(),
)
def test_pool_by_position_takes_the_max_over_held_kvs_within_the_radius(
    width, kernel, seed, in_order, by_span
):
    """Held KVs in scrambled slot order with gaps between positions (as after compaction),
    or each slot holding its own position (before), some slots unheld: each held slot gets
    the max over held slots within kernel // 2, then (``by_span``) the max of that over the
    held slots of its span."""
    gen = torch.Generator().manual_seed(seed)
    H, G = 2, 3
    if in_order:
        positions = torch.arange(width).expand(H, width)
    else:
        positions = torch.stack(
            [torch.randperm(3 * width, generator=gen)[:width] for _ in range(H)]
        )
    valid = torch.rand(H, width, generator=gen) < 0.8
    scores = torch.rand(H, G, width, generator=gen)
    spans = None
    if by_span:
        # Each row's own spans over every position it may hold: starts drawn at random.
        starts = torch.rand(H, 3 * width, generator=gen) < 0.4
        starts[:, 0] = True
        where = torch.where(starts, torch.arange(3 * width), 0)
        spans = torch.cummax(where, dim=1).values
    got = pool_by_position(scores, positions, valid, kernel, spans)
    r = kernel // 2
    near = torch.zeros(H, G, width)
    for h in range(H):
        for j in range(width):
            if valid[h, j]:
                close = valid[h] & ((positions[h] - positions[h, j]).abs() <= r)
                near[h, :, j] = scores[h][:, close].amax(dim=-1)
    for h in range(H):
        for j in range(width):
            if not valid[h, j]:
                assert torch.equal(got[h, :, j], scores[h, :, j])
                continue
            want = near[h, :, j]
            if spans is not None:
                mates = valid[h] & (spans[h][positions[h]] == spans[h][positions[h, j]])
                want = near[h][:, mates].amax(dim=-1)
            assert torch.equal(got[h, :, j], want)


def test_pool_by_position_on_contiguous_positions_is_max_pool1d():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 2, 40, generator=gen)
    positions = torch.arange(40).expand(3, 40)
    want = torch.nn.functional.max_pool1d(scores.view(6, 1, 40), 7, 1, 3).view(3, 2, 40)
    got = pool_by_position(scores, positions, torch.ones(3, 40, dtype=torch.bool), 7)
    assert torch.equal(got, want)
