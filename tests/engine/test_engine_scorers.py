"""Every scorer, selected per request, frees real blocks through the engine's public API."""

from __future__ import annotations

import math

import pytest

from kvcompress.compress import SCORERS
from kvcompress.engine import SamplingParams
from kvcompress.errors import InvalidParameterError

PROMPT = (
    "The museum opened its new wing on a rainy Tuesday. Visitors lined up early to see the "
    "collection of old maps, ship models and letters written by sailors. The secret code is "
    "1585963. A guide explained how each map was drawn by hand and copied many times. "
) * 3


@pytest.mark.parametrize("scorer", [s for s in SCORERS if s != "last-query"])
def test_each_scorer_compresses_to_the_budget_and_returns_blocks(engine, scorer):
    ids = engine.tokenize(PROMPT)
    free = engine.capacity().free_blocks
    compression = {"max_cache_tokens": 48, "protected_window": 8, "scorer": scorer}
    result = engine.teacher_force(ids, ids[:1], compression)
    cap = engine.capacity()
    allowed = math.ceil(48 * cap.heads / cap.block_size)
    assert result.kv.blocks == allowed  # global selection frees exactly down to the budget
    assert result.kv.kvs_kept <= 48 * cap.heads < len(ids) * cap.heads
    if scorer != "position":  # every head holds the same positions: equal shares
        assert len({n for row in result.kv.kept_per_layer_head for n in row}) > 1
    assert engine.capacity().free_blocks == free  # all returned when the request ends


def test_last_query_is_refused_before_anything_runs(engine):
    free = engine.capacity().free_blocks
    ids = engine.tokenize(PROMPT)
    compression = {"max_cache_tokens": 48, "scorer": "last-query"}
    with pytest.raises(InvalidParameterError, match="queries of the last step") as err:
        engine.teacher_force(ids, ids[:1], compression)
    assert err.value.param == "scorer"
    with pytest.raises(InvalidParameterError, match="queries of the last step"):
        engine.add_request(ids, SamplingParams(max_tokens=2), compression)
    assert not engine.has_unfinished_requests()
    assert engine.capacity().free_blocks == free


def test_context_compressed_by_key_norm_before_its_question(engine):
    free = engine.capacity().free_blocks
    engine.add_request(
        PROMPT,
        SamplingParams(max_tokens=4, temperature=0.0),
        {"max_cache_tokens": 48, "protected_window": 8, "scorer": "key-norm"},
        suffix=" What is the secret code? The secret code is",
    )
    final = [o for o in engine.run() if o.finished]
    assert len(final) == 1 and final[0].finish_reason == "length"
    assert final[0].kv.compressions == 1
    assert final[0].kv.kvs_kept < final[0].kv.kvs_seen / 2
    assert engine.capacity().free_blocks == free
