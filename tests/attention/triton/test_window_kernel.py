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
    ("T", "w", "group", "power", "buffer", "pool"),
    [(37, 8, 1, 2, 0, 7), (50, 20, 3, 1, 4, 1), (9, 9, 4, 2, 2, 3), (1, 1, 2, 2, 0, 7)],
    ids=["l2-pool7", "l1-g3-buffer", "whole-prompt-window", "one-token"],
)
def test_window_metric_matches_the_reference(T, w, group, power, buffer, pool) -> None:
    gen = torch.Generator().manual_seed(T)
    kv_heads, dim = 2, 16
    q = torch.randn(T, kv_heads * group, dim, generator=gen) * 2  # peaked softmax rows
    k = torch.randn(T, kv_heads, dim, generator=gen)
    q_win = q[T - w :].transpose(0, 1)  # [Hq, w, D], a strided view as the backend passes it
    config = MetricConfig(window_size=w, collection_buffer=buffer, pool_kernel=pool)
    expected = reference(q_win, k, dim**-0.5, power, config)
    dev = torch.device(DEVICE)
    got = window_metric(q_win.to(dev), k.to(dev), dim**-0.5, power, config, block_n=16)
    assert got.shape == (kv_heads, T)
    torch.testing.assert_close(got.cpu(), expected, atol=1e-5, rtol=1e-4)
