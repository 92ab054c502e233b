"""Compression keeps the next-token distribution where it should, on natural text."""

from __future__ import annotations

from kvcompress.compress import CompressionParams
from kvcompress.eval.texts import pydoc_text


def agreement(a, b) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).float().mean())


def test_kvcompress_at_rate_4_keeps_greedy_agreement(engine):
    ids = engine.tokenizer(pydoc_text()[:60_000], add_special_tokens=False)["input_ids"]
    prefix, continuation = ids[:3000], ids[3000:3128]
    full = engine.teacher_force(prefix, continuation, CompressionParams(policy="full")).logits
    kvc, kv = engine.teacher_force(
        prefix,
        continuation,
        CompressionParams(compression_rate=4, compress_once=True, min_cache_tokens=0),
    )
    rate = kv.compression_rate
    rnd = engine.teacher_force(
        prefix,
        continuation,
        CompressionParams("random", compression_rate=4, compress_once=True, min_cache_tokens=0),
    ).logits
    ours, random_ = agreement(full, kvc), agreement(full, rnd)
    print(f"agreement at rate {rate:.2f}: kvcompress {ours:.3f}, random {random_:.3f}")
    assert rate > 3
    assert ours >= 0.85
    assert ours >= random_ + 0.1
