"""A request's own metric settings (pool_kernel, window_size, collection_buffer) against the
engine-wide MetricConfig that supplies the defaults."""

from __future__ import annotations

import torch

from kvcompress.compress import MetricConfig
from tests.engine.conftest import make_engine, prose_ids

BUDGET = {"max_cache_tokens": 48, "protected_window": 8}


def test_a_requests_settings_keep_what_an_engine_defaulting_to_them_keeps(engine):
    """``pool_kernel=9`` (and a window and buffer) given by a request keep exactly the KVs,
    with exactly the metric, that an engine whose MetricConfig defaults to them keeps."""
    settings = {"pool_kernel": 9, "window_size": 16, "collection_buffer": 2}
    ids = prose_ids(engine, 200)
    own = engine.inspect_kept(ids, BUDGET | settings)
    other = make_engine(kv_cache_memory="64MiB", max_num_seqs=2, metric=MetricConfig(**settings))
    by_default = other.inspect_kept(ids, BUDGET)
    assert torch.equal(own.positions, by_default.positions)
    torch.testing.assert_close(own.metric, by_default.metric, equal_nan=True)
    # The settings matter: the engine's own defaults (kernel 21, window 32) keep other KVs.
    assert not torch.equal(engine.inspect_kept(ids, BUDGET).positions, own.positions)


def _spans_needle(engine) -> list[int]:
    text = "The special magic number for quick-fox is: 1585963. Remember it. "
    needle = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    return prose_ids(engine, 150) + needle + prose_ids(engine, 60, offset=4000)


def _unequal_spans(kept, starts: torch.Tensor) -> int:
    """How many (head, span) pairs hold KVs of one span with different metrics."""
    unequal = 0
    for layer in range(kept.positions.shape[0]):
        for head in range(kept.positions.shape[1]):
            held = kept.positions[layer, head] >= 0
            span = starts[kept.positions[layer, head][held]]
            metric = kept.metric[layer, head][held]
            for s in span.unique():
                values = metric[span == s]
                unequal += int(not torch.equal(values, values[:1].expand_as(values)))
    return unequal


def test_pool_spans_gives_each_held_kv_its_spans_metric_in_one_chunk_and_chunked(engine):
    """With ``pool_spans`` (and no pool along positions, kernel 1) the KVs a head keeps of
    one span (a word, a number) share one metric, whether the prompt is prefilled in one
    chunk or in chunks whose window re-scores what compaction left; without it they don't."""
    from kvcompress.engine.token_spans import TokenSpans

    ids = _spans_needle(engine)
    starts = TokenSpans.from_tokenizer(engine.tokenizer).span_starts(ids)
    assert (starts != torch.arange(len(ids))).sum() > 10  # multi-token spans to test
    settings = BUDGET | {"pool_kernel": 1}
    chunked = make_engine(kv_cache_memory="64MiB", max_num_seqs=2, prefill_chunk_size=64)
    for eng in (engine, chunked):
        assert _unequal_spans(eng.inspect_kept(ids, settings | {"pool_spans": True}), starts) == 0
        assert _unequal_spans(eng.inspect_kept(ids, settings), starts) > 0
