import pytest

from kvcompress.compress import CompressionParams


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(policy="snapkv"), "unknown policy"),
        (dict(compression_rate=0.5), "compression_rate"),
        (dict(compression_rate=float("inf")), "compression_rate"),
        (dict(max_cache_tokens=0), "max_cache_tokens"),
        (dict(max_cache_tokens=2.5), "max_cache_tokens"),
        (dict(compression_rate=2, max_cache_tokens=64), "not both"),
        (dict(protected_window=-1), "protected_window"),
        (dict(sinks=-2), "sinks"),
        (dict(layer_floor=1.5), "layer_floor"),
        (dict(layer_floor=-0.1), "layer_floor"),
        (dict(layer_floor=float("nan")), "layer_floor"),
        (dict(layer_floor=True), "layer_floor"),
        (dict(metric="l3-sum"), "metric"),
        (dict(compression_interval=0), "compression_interval"),
        (dict(window_size=0), "window_size"),
        (dict(pool_kernel=20), "pool_kernel"),
        (dict(pool_spans=1), "pool_spans"),
        (dict(pool_spans="yes"), "pool_spans"),
        (dict(collection_buffer=-1), "collection_buffer"),
    ],
)
def test_bad_params_are_rejected_with_a_reason(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompressionParams(**kwargs)


def test_what_evicts():
    assert not CompressionParams().evicts
    assert not CompressionParams(compression_rate=1).evicts
    assert CompressionParams(compression_rate=2).evicts
    assert not CompressionParams("full", max_cache_tokens=4).evicts
    assert CompressionParams("h2o", metric="l2-sum").power == 1
    assert CompressionParams(metric="l2-avg").power == 2


def test_errors_are_typed_and_name_their_field():
    from kvcompress.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError) as info:
        CompressionParams(protected_window=-1)
    assert info.value.param == "protected_window" and info.value.code == "invalid_parameter"


def test_fields_set_records_what_the_caller_gave():
    assert CompressionParams().fields_set == frozenset()
    assert CompressionParams("uniform", compression_rate=4).fields_set == {
        "policy",
        "compression_rate",
    }


def test_with_overrides_keeps_what_is_not_given_and_clears_what_is_none():
    defaults = CompressionParams(compression_rate=4, protected_window=64, compression_interval=8)
    assert defaults.with_overrides() == defaults
    assert defaults.with_overrides(sinks=2).protected_window == 64
    cleared = defaults.with_overrides({"compression_interval": None})
    assert cleared.compression_interval is None and cleared.compression_rate == 4
    # A whole CompressionParams applies only the fields it was given.
    merged = defaults.with_overrides(CompressionParams(policy="h2o"))
    assert (merged.policy, merged.compression_rate, merged.protected_window) == ("h2o", 4, 64)
    # Giving one budget clears the other; giving both is still an error.
    assert defaults.with_overrides(max_cache_tokens=32).compression_rate is None
    with pytest.raises(ValueError, match="not both"):
        defaults.with_overrides(max_cache_tokens=32, compression_rate=2)
    # Overrides stack: fields given at each level are remembered.
    assert merged.with_overrides(sinks=1).fields_set >= {"policy", "sinks", "compression_rate"}


@pytest.mark.parametrize(
    ("overrides", "param", "match"),
    [
        ({"protected_windw": 3}, "protected_windw", "unknown compression field"),
        ({"policy": None}, "policy", "cannot be null"),
        ({"sinks": "2"}, "sinks", "integer"),
        ({"compress_once": 1}, "compress_once", "boolean"),
        ({"compression_rate": True}, "compression_rate", "number"),
        ({"pool_kernel": 8}, "pool_kernel", "odd"),
        ({"window_size": "8"}, "window_size", "integer"),
    ],
)
def test_bad_overrides_name_their_field(overrides, param, match):
    with pytest.raises(ValueError, match=match) as info:
        CompressionParams().with_overrides(overrides)
    assert info.value.param == param


def test_the_schema_lists_every_field_with_its_default_and_help():
    import dataclasses

    from kvcompress.compress import compression_fields

    specs = compression_fields()
    assert [s.name for s in specs] == [f.name for f in dataclasses.fields(CompressionParams)]
    defaults = CompressionParams()
    for spec in specs:
        assert getattr(defaults, spec.name) == spec.default and spec.help
        assert spec.type in (int, float, str, bool)
    nullable = {s.name for s in specs if s.nullable}
    assert nullable == {
        "compression_rate",
        "max_cache_tokens",
        "compression_interval",
        "window_size",
        "pool_kernel",
        "pool_spans",
        "collection_buffer",
    }
    assert CompressionParams(compression_rate=2).to_dict()["compression_rate"] == 2


def test_a_field_parses_its_value_from_text():
    from kvcompress.compress import compression_fields

    spec = {s.name: s for s in compression_fields()}
    assert spec["sinks"].parse("4") == 4
    assert spec["layer_floor"].parse("0.75") == 0.75
    assert spec["metric"].parse("l1-sum") == "l1-sum"
    assert spec["pool_kernel"].parse("None") is None  # nullable
    assert [spec["compress_once"].parse(t) for t in ("on", "True", "1", "off", "no")] == [
        True,
        True,
        True,
        False,
        False,
    ]
    for name, text in [("sinks", "none"), ("sinks", "1.5"), ("compress_once", "maybe")]:
        with pytest.raises(ValueError, match=f"{name} takes"):
            spec[name].parse(text)


def test_prefill_signature_names_what_the_prefill_collects():
    from kvcompress.compress import shared_prefill_signature
    from kvcompress.errors import InvalidParameterError

    def sig(**kwargs):
        return CompressionParams(compression_rate=4, **kwargs).prefill_signature()

    l2 = sig()
    assert l2.metric_power == 2 and l2 == sig(policy="uniform") == sig(policy="pyramid")
    assert sig(policy="h2o").metric_power == 1 == sig(metric="l1-avg").metric_power
    # Nothing to collect: no eviction, a position or random score, a query-free scorer.
    for kwargs in (dict(policy="streaming"), dict(policy="random"), dict(scorer="key-norm")):
        assert sig(**kwargs) is None
    assert CompressionParams(compression_rate=1).prefill_signature() is None
    assert CompressionParams(policy="full").prefill_signature() is None

    many = [CompressionParams(policy=p, compression_rate=8) for p in ("streaming", "uniform")]
    assert shared_prefill_signature(many) == l2
    assert shared_prefill_signature(many[:1]) is None
    with pytest.raises(InvalidParameterError, match=r"uniform needs the L2 .* h2o needs the L1"):
        shared_prefill_signature([*many, CompressionParams(policy="h2o", compression_rate=8)])
    # The request's metric settings: another window or pooling needs another prefill.
    assert sig(window_size=8) != sig(window_size=16) != sig()
    assert sig(pool_kernel=3) != sig() == sig(sinks=4)
    assert sig(pool_spans=True) != sig(pool_spans=False) != sig()
    assert "window_size=8" in str(sig(window_size=8))


def test_metric_settings_are_the_requests_own_over_the_engines():
    from kvcompress.compress import MetricConfig

    engine = MetricConfig(window_size=16, pool_kernel=3, collection_buffer=2)
    # A request that gives none collects as the engine does (the very object).
    assert CompressionParams().metric_settings(engine) is engine
    own = CompressionParams(pool_kernel=21, collection_buffer=0).metric_settings(engine)
    assert own == MetricConfig(window_size=16, pool_kernel=21, collection_buffer=0)
    spans = CompressionParams(pool_spans=True).metric_settings(engine)
    assert spans == MetricConfig(
        window_size=16, pool_kernel=3, collection_buffer=2, pool_spans=True
    )
    # null clears a default request setting back to the engine's.
    defaults = CompressionParams(pool_kernel=21)
    assert defaults.with_overrides(pool_kernel=None).metric_settings(engine) is engine
