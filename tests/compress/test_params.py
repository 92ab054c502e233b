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
        (dict(metric="l3-sum"), "metric"),
        (dict(compression_interval=0), "compression_interval"),
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
