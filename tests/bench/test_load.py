"""Pieces of the load benchmark that need no server."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from kvcompress.bench.load import (
    LoadConfig,
    Probe,
    RequestRecord,
    percentile,
    split_gaps,
    summarize,
)


def test_percentile_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 90) == 90
    assert percentile(values, 99) == 99
    assert percentile([3.0], 99) == 3.0
    assert math.isnan(percentile([], 50))


def test_summarize_counts_only_successes():
    records = [
        RequestRecord(
            start=0.0, first=0.5, end=2.0, tokens=4, gaps=[0.5, 0.5, 0.5], compression_rate=3.0
        ),
        RequestRecord(
            start=1.0, first=1.2, end=3.0, tokens=4, gaps=[0.6, 0.6, 0.6], compression_rate=5.0
        ),
        RequestRecord(start=1.0, error="HTTP 429"),
    ]
    row = summarize(8, records, elapsed=4.0, stats=SimpleNamespace(preemptions=2))
    assert row["requests"] == 2 and row["errors"] == 1
    assert row["req_per_s"] == 0.5 and row["out_tok_per_s"] == 2.0
    assert row["ttft_p50"] == pytest.approx(0.2) and row["ttft_p99"] == pytest.approx(0.5)
    assert row["kv_rate"] == 4.0 and row["preemptions"] == 2


def test_gaps_are_split_by_overlap_with_oversized_requests():
    # Gaps (end - gap, end): (0, 1), (1, 4), (4, 5), (5, 6); one probe in flight over (2, 3).
    rec = RequestRecord(start=0.0, first=0.0, end=6.0, gaps=[1, 3, 1, 1], gap_ends=[1, 4, 5, 6])
    during, quiet = split_gaps([rec], [Probe(2.0, 3.0, 400)])
    assert during == [3] and quiet == [1, 1, 1]
    row = summarize(1, [rec], 6.0, SimpleNamespace(preemptions=0), [Probe(2.0, 3.0, 400)])
    assert row["itl_p90_during"] == 3 and row["itl_p90_quiet"] == 1
    assert row["oversized"] == 1 and row["oversized_status"] == "400"
    # Without probes the row has no such columns (the plain load run).
    assert "itl_p90_during" not in summarize(1, [rec], 6.0, SimpleNamespace(preemptions=0))


def test_config_is_validated():
    with pytest.raises(ValueError):
        LoadConfig(rates=(0.5,))
    with pytest.raises(ValueError):
        LoadConfig(clients=0)
    with pytest.raises(ValueError):
        LoadConfig(oversized=-1)
