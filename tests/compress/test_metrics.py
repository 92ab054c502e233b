import math

import pytest
import torch

from kvcompress.compress import MetricConfig, decode_metric, window_metric
from kvcompress.errors import InvalidParameterError


def naive_window_metric(q, k, scale, power, buffer, kernel):
    """Loops over heads, window queries and keys, straight from the definition."""
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
    return pooled.view(hkv, group, T).sum(1)


@pytest.mark.parametrize(("power", "buffer", "kernel"), [(2, 0, 7), (1, 0, 1), (2, 3, 5)])
def test_window_metric_matches_definition(power, buffer, kernel):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(4, 5, 8, generator=g)
    k = torch.randn(19, 2, 8, generator=g)
    cfg = MetricConfig(window_size=5, collection_buffer=buffer, pool_kernel=kernel)
    ours = window_metric(q, k, 8**-0.5, power, cfg)
    assert torch.allclose(
        ours.double(), naive_window_metric(q, k, 8**-0.5, power, buffer, kernel), atol=1e-5
    )


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
    ],
)
def test_metric_config_validation_names_the_setting(kwargs, param):
    with pytest.raises(InvalidParameterError) as err:
        MetricConfig(**kwargs)
    assert err.value.param == param
