"""The grid: which runs it needs, and the compression each one runs with."""

from __future__ import annotations

import re

import pytest

from kvcompress.compress import CompressionParams, compression_fields
from kvcompress.eval.sweep import FULL, SWEPT_FIELDS, Setting, SweepConfig, parse_variant


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


def test_a_variant_is_its_policy_with_fields_set_over_the_base():
    name = "kvcompress:layer_floor=0.75:pool_kernel=7:compress_once=on:window_size=none"
    variant = parse_variant(name)
    assert variant.policy == "kvcompress"
    assert variant.overrides == {
        "layer_floor": 0.75,
        "pool_kernel": 7,
        "compress_once": True,
        "window_size": None,
    }
    assert parse_variant("h2o") == ("h2o", {})

    base = CompressionParams(protected_window=16, pool_kernel=21, window_size=64)
    sweep = SweepConfig(policies=("full", "kvcompress", name), rates=(1, 8), compression=base)
    assert sweep.settings() == [FULL, Setting("kvcompress", 8), Setting(name, 8)]
    assert sweep.run_setting(name, 1) == FULL  # rate 1 evicts nothing, whatever the fields
    params = sweep.params(Setting(name, 8))
    assert (params.policy, params.compression_rate) == ("kvcompress", 8.0)
    assert (params.layer_floor, params.pool_kernel, params.compress_once) == (0.75, 7, True)
    assert params.window_size is None  # the engine's, as the variant asks
    assert params.protected_window == 16  # the base's, where the variant says nothing
    plain = sweep.params(Setting("kvcompress", 8))
    assert (plain.layer_floor, plain.pool_kernel, plain.window_size) == (0.0, 21, 64)
    assert sweep.to_dict()["policies"] == ["full", "kvcompress", name]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("kvc:sinks=4", "unknown policy kvc in 'kvc:sinks=4'"),
        ("full:sinks=4", "full evicts nothing"),
        ("kvcompress:sinks", "'sinks' is not field=value"),
        ("kvcompress:budget=4", "'budget=4' is not field=value"),
        ("kvcompress:compression_rate=4", "the sweep sets compression_rate itself"),
        ("kvcompress:sinks=1:sinks=2", "sets sinks twice"),
        ("kvcompress:sinks=1.5", "sinks takes int values, got '1.5'"),
        ("kvcompress:compress_once=maybe", "compress_once takes bool values"),
        ("kvcompress:sinks=none", "sinks takes int values"),  # not a nullable field
        # Parsed, then refused by the schema when the sweep checks its runs.
        ("kvcompress:layer_floor=1.5", "'kvcompress:layer_floor=1.5': layer_floor must be"),
        ("kvcompress:metric=l3", "unknown metric 'l3'"),
    ],
)
def test_a_bad_variant_is_refused_with_what_is_wrong(name, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SweepConfig(policies=("kvcompress", name))
