"""The offline LLM: options split into engine and compression configs."""

from __future__ import annotations

import pytest

from kvcompress import LLM, CompressionParams, SamplingParams
from kvcompress.eval import pydoc_text


def test_unknown_options_are_refused_before_loading_anything():
    with pytest.raises(TypeError, match="compresion_rate"):
        LLM(compresion_rate=4)


@pytest.mark.slow
def test_generate_keeps_order_and_applies_defaults_and_overrides():
    llm = LLM(kv_cache_memory="64MiB", compression_rate=4, protected_window=8, pool_kernel=5)
    engine_defaults = llm.engine.config
    # The metric settings are compression fields: defaults of every request, one route.
    assert engine_defaults.compression == CompressionParams(
        compression_rate=4, protected_window=8, pool_kernel=5
    )
    ids = llm.tokenizer(pydoc_text()[:4000], add_special_tokens=False)["input_ids"][:300]
    sampling = SamplingParams(max_tokens=3, ignore_eos=True)
    outs = llm.generate(
        [ids, ids[:200]], sampling, [None, CompressionParams(policy="full")], use_tqdm=False
    )
    assert [o.prompt_tokens for o in outs] == [300, 200]
    assert outs[0].kv.compression_rate > 2  # the engine default rate 4
    assert outs[1].kv.compression_rate == 1.0  # the request's own policy
    assert all(len(o.token_ids) == 3 and o.finished for o in outs)
    # One output per prompt: several choices are refused, not silently cut to one.
    with pytest.raises(ValueError, match="n > 1") as err:
        llm.generate([ids], SamplingParams(n=2, max_tokens=2, temperature=1.0), use_tqdm=False)
    assert err.value.param == "n"
    assert not llm.engine.has_unfinished_requests()
