"""The grid: which runs it needs, and the compression each one runs with."""

from __future__ import annotations

import pytest

from kvcompress.compress import CompressionParams, compression_fields
from kvcompress.eval.sweep import FULL, SWEPT_FIELDS, Setting, SweepConfig


def test_full_and_rate_one_share_one_run():
    sweep = SweepConfig(policies=("full", "kvcompress", "random"), rates=(1, 4, 16))
    assert sweep.settings() == [
        FULL,
        *(Setting(p, r) for p in ("kvcompress", "random") for r in (4, 16)),
    ]
    assert sweep.run_setting("full", 16) == FULL
    assert sweep.run_setting("kvcompress", 1) == FULL
    assert sweep.params(FULL).evicts is False
    params = sweep.params(Setting("kvcompress", 4))
    assert (params.policy, params.compression_rate, params.evicts) == ("kvcompress", 4.0, True)
    assert sweep.heatmap_rate() == 16
    assert SweepConfig(rates=(1,)).heatmap_rate() is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"policies": ("kvcompress", "nope")}, "unknown policy"),
        ({"policies": ()}, "no policies"),
        ({"rates": (0.5,)}, "rates must be numbers >= 1"),
    ],
)
def test_sweep_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SweepConfig(**kwargs)


def test_base_compression_is_checked_and_leaves_the_swept_fields_alone():
    with pytest.raises(ValueError, match="protected_window"):
        SweepConfig(compression=CompressionParams(protected_window=-1))
    for given in ({"policy": "h2o"}, {"compression_rate": 2.0}, {"max_cache_tokens": 64}):
        with pytest.raises(ValueError, match=f"sweep sets {next(iter(given))}"):
            SweepConfig(compression=CompressionParams(**given))


def test_every_run_carries_the_base_with_its_policy_and_rate():
    base = CompressionParams(protected_window=16, sinks=4, metric="l1-sum")
    sweep = SweepConfig(compression=base)
    names = {spec.name for spec in compression_fields()}
    for setting in sweep.settings():
        params = sweep.params(setting)
        # Every field given: the engine's defaults cannot change what the sweep reports.
        assert params.fields_set == names
        assert (params.protected_window, params.sinks, params.metric) == (16, 4, "l1-sum")
        assert params.policy == setting.policy
    assert sweep.params(FULL).compression_rate is None
    assert sweep.params(Setting("uniform", 16)).compression_rate == 16.0


def test_json_config_follows_the_compression_schema():
    # The JSON lists the schema's fields by itself: a field added to CompressionParams
    # appears here without eval naming it.
    base = CompressionParams(protected_window=16, compress_once=True)
    config = SweepConfig(policies=("full", "h2o"), rates=(1, 8), compression=base).to_dict()
    names = [spec.name for spec in compression_fields() if spec.name not in SWEPT_FIELDS]
    assert list(config["compression"]) == names
    assert config["compression"] == {name: getattr(base, name) for name in names}
    assert (config["policies"], config["rates"]) == (["full", "h2o"], [1, 8])
    assert config["shared_prefill"] is True  # which prefill mode ran
    assert set(SWEPT_FIELDS) <= {spec.name for spec in compression_fields()}
