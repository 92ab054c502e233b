"""The generation suites: spec checks, and a real (tiny) RULER sweep on the default model."""

from __future__ import annotations

import json

import pytest

from kvcompress.compress import exact_rates
from kvcompress.eval.suites import RulerSpec, run_ruler
from kvcompress.eval.sweep import SweepConfig
from tests.eval.shared_engine import shared_engine


def test_ruler_spec_rejects_unknown_task():
    with pytest.raises(ValueError, match="unknown RULER task"):
        RulerSpec(tasks=("niah_single", "haystack"))


@pytest.mark.slow
def test_ruler_sweep_rows_and_document():
    engine = shared_engine()
    sweep = SweepConfig(policies=("full", "kvcompress", "random"), rates=(1, 16), chat=True)
    spec = RulerSpec(tasks=("niah_single",), lengths=(256,), num_samples=2)
    result = run_ruler(engine, spec, sweep, progress=False)

    assert [(r.policy, r.rate) for r in result.rows] == [
        (p, r) for p in ("full", "kvcompress", "random") for r in (1, 16)
    ]
    by = {(r.policy, r.rate): r for r in result.rows}
    for row in result.rows:
        assert row.as_dict().keys() == {
            "suite",
            "task",
            "length",
            "policy",
            "rate",
            "achieved_rate",
            "score",
            "num_samples",
        }
        assert (row.suite, row.task, row.length, row.num_samples) == (
            "ruler",
            "niah_single",
            256,
            2,
        )
        assert 0.0 <= row.score <= 100.0
    # Every rate-1 row and every full row is the one uncompressed run.
    for key in [("full", 16), ("kvcompress", 1), ("random", 1)]:
        assert by[key].score == by["full", 1].score
        assert by[key].achieved_rate == 1.0
    assert by["kvcompress", 16].achieved_rate > 2
    assert by["random", 16].achieved_rate > 2
    # The pass key is easy for the default model with a full cache.
    assert by["full", 1].score == 100.0
    assert by["full", 16].score >= by["random", 16].score

    assert result.kept is not None and result.kept.rate == 16
    assert set(result.kept.grids) == {"kvcompress", "random"}  # full keeps everything
    grid = result.kept.grids["kvcompress"]
    layers, heads = engine.model_config.num_layers, engine.model_config.num_kv_heads
    assert len(grid) == layers and all(len(row) == heads for row in grid)
    document = json.loads(json.dumps(result.document()))
    assert document["suite"] == "ruler" and len(document["rows"]) == 6
    assert document["config"]["chat"] is True


@pytest.mark.slow
def test_shared_prefill_scores_what_one_request_per_pair_scores():
    """Prompts that fit one prefill chunk: sharing the prefill changes nothing but cost."""
    engine = shared_engine()
    spec = RulerSpec(tasks=("niah_single",), lengths=(256,), num_samples=1)
    results = {}
    for shared in (True, False):
        sweep = SweepConfig(
            policies=("kvcompress", "streaming", "h2o"), rates=(8,), shared_prefill=shared
        )
        results[shared] = run_ruler(engine, spec, sweep, progress=False)
        assert results[shared].document()["config"]["shared_prefill"] is shared
    assert results[True].samples == results[False].samples
    assert results[True].rows == results[False].rows
    assert results[True].kept == results[False].kept


@pytest.mark.slow
def test_a_variant_runs_with_its_own_fields_beside_its_policy():
    """Variants share the grid's prompts and report under their own names; each runs with
    its fields, including one that needs a prefill of its own (another metric)."""
    engine = shared_engine()
    spec = RulerSpec(tasks=("niah_single",), lengths=(256,), num_samples=1)
    names = ("kvcompress", "kvcompress:min_cache_tokens=4096", "kvcompress:metric=l1-sum")
    result = run_ruler(engine, spec, SweepConfig(policies=names, rates=(8,)), progress=False)
    by = {row.policy: row for row in result.rows}
    assert list(by) == list(names)
    assert by["kvcompress"].achieved_rate > 2
    # Its floor is above the prompt: the variant kept every KV.
    assert by["kvcompress:min_cache_tokens=4096"].achieved_rate == 1.0
    assert result.kept is not None and set(result.kept.grids) == set(names)

    # The metric variant is what the same metric as the sweep's base gives.
    base = SweepConfig(
        policies=("kvcompress",), rates=(8,), compression=exact_rates(metric="l1-sum")
    )
    alone = run_ruler(engine, spec, base, progress=False)
    assert by["kvcompress:metric=l1-sum"].achieved_rate == alone.rows[0].achieved_rate
    assert result.kept.grids["kvcompress:metric=l1-sum"] == alone.kept.grids["kvcompress"]
    assert result.kept.grids["kvcompress:metric=l1-sum"] != result.kept.grids["kvcompress"]
