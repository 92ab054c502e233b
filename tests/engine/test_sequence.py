"""Sequence bookkeeping the engine reads every step."""

from __future__ import annotations

import pytest

from kvcompress.compress import CompressionParams
from kvcompress.engine.sampling import SamplingParams
from kvcompress.engine.sequence import Sequence


def make(params: CompressionParams | None = None) -> Sequence:
    return Sequence("s", [5, 6, 7], SamplingParams(), params or CompressionParams())


def test_last_token_and_length_follow_appends_of_either_kind() -> None:
    seq = make()
    assert (seq.last_token, seq.num_tokens) == (7, 3)
    seq.append_prompt_token(8)  # a suffix token fed after prefill
    assert (seq.last_token, seq.num_tokens) == (8, 4)
    seq.append_token(9)
    assert (seq.last_token, seq.num_tokens) == (9, 5)
    seq.output_token_ids.append(10)  # direct appends (the engine's today) stay correct
    assert (seq.last_token, seq.num_tokens) == (10, 6)
    assert seq.token_ids == [5, 6, 7, 8, 9, 10]
    with pytest.raises(ValueError, match="generated"):
        seq.append_prompt_token(11)


@pytest.mark.parametrize(
    ("params", "collects"),
    [
        (CompressionParams(compression_rate=4, min_cache_tokens=0), True),
        (CompressionParams(policy="h2o", max_cache_tokens=64), True),
        (CompressionParams(policy="pyramid", compression_rate=4, min_cache_tokens=0), True),
        (CompressionParams(policy="streaming", compression_rate=4, min_cache_tokens=0), False),
        (CompressionParams(policy="random", compression_rate=4, min_cache_tokens=0), False),
        (CompressionParams(policy="full", compression_rate=4, min_cache_tokens=0), False),
        (CompressionParams(), False),  # no budget: never evicts
    ],
)
def test_collects_metric_only_for_metric_scored_evicting_policies(params, collects) -> None:
    assert make(params).collects_metric is collects


def test_compress_once_stops_collecting_after_compressing() -> None:
    seq = make(CompressionParams(compression_rate=4, compress_once=True, min_cache_tokens=0))
    assert seq.collects_metric
    seq.compressions = 1
    assert seq.collects_metric  # compressed between prompt chunks: the prefill goes on
    seq.prefilled = True
    assert not seq.collects_metric
    seq.compressions = 0  # preempted: recomputed and compressed again
    assert seq.collects_metric
    again = make(CompressionParams(compression_rate=4, min_cache_tokens=0))
    again.compressions = 3
    assert again.collects_metric
