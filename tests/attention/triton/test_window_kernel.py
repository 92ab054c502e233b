"""The streaming window-metric kernels against compress.window_metric (the reference)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kvcompress.attention.triton.window import window_metric
from kvcompress.compress import MetricConfig
from kvcompress.compress import window_metric as reference

from .conftest import DEVICE


@pytest.mark.parametrize(
    ("T", "w", "group", "power", "buffer", "pool", "spans"),
    [
        (37, 8, 1, 2, 0, 7, False),
        (50, 20, 3, 1, 4, 1, False),
        (9, 9, 4, 2, 2, 3, False),
        (1, 1, 2, 2, 0, 7, False),
        (37, 8, 3, 2, 0, 3, True),
    ],
    ids=["l2-pool7", "l1-g3-buffer", "whole-prompt-window", "one-token", "spans"],
)
def test_window_metric_matches_the_reference(T, w, group, power, buffer, pool, spans) -> None:
    gen = torch.Generator().manual_seed(T)
    kv_heads, dim = 2, 16
    q = torch.randn(T, kv_heads * group, dim, generator=gen) * 2  # peaked softmax rows
    k = torch.randn(T, kv_heads, dim, generator=gen)
    q_win = q[T - w :].transpose(0, 1)  # [Hq, w, D], a strided view as the backend passes it
    config = MetricConfig(
        window_size=w, collection_buffer=buffer, pool_kernel=pool, pool_spans=spans
    )
    # Spans of four tokens (a number, say): each position's span start.
    starts = torch.arange(T) // 4 * 4 if spans else None
    expected = reference(q_win, k, dim**-0.5, power, config, starts)
    dev = torch.device(DEVICE)
    on_dev = None if starts is None else starts.to(dev)
    got = window_metric(q_win.to(dev), k.to(dev), dim**-0.5, power, config, on_dev, block_n=16)
    assert got.shape == (kv_heads, T)
    torch.testing.assert_close(got.cpu(), expected, atol=1e-5, rtol=1e-4)
