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
