"""KeptKVs: what each head of a sequence holds, read from a PagedKVCache."""

from __future__ import annotations

import torch

from kvcompress.compress import CompressionParams, Compressor, kept_kvs
from tests.compress.reference_planner import head_contents


def test_kept_kvs_lists_each_heads_positions_metrics_and_ranks(filled_cache):
    cache, slots = filled_cache([50], lambda layer, head, pos, seq: (pos * 7 + layer) % 13)
    slot = slots[0]
    Compressor(cache).compress([slot], [CompressionParams(max_cache_tokens=10, protected_window=4)])
    kept = kept_kvs(cache, slot)
    assert kept.seq_len == 50
    assert kept.kept.tolist() == cache.context_lens[:, slot].tolist()
    span = torch.tensor([0, 3, 46, 49])
    holds, ranks = kept.holds(span), kept.span_ranks(span)
    for layer in range(cache.num_layers):
        for head in range(cache.num_kv_heads):
            contents = sorted((pos, m) for _, pos, m in head_contents(cache, slot, layer, head))
            n = len(contents)
            assert kept.positions[layer, head, :n].tolist() == [p for p, _ in contents]
            assert (kept.positions[layer, head, n:] == -1).all()
            assert kept.metric[layer, head, :n].tolist() == [m for _, m in contents]
            # Rank: how many held KVs have a higher metric, ties broken by position.
            by_metric = sorted(contents, key=lambda c: (-c[1], c[0]))
            rank_of = {p: r for r, (p, _) in enumerate(by_metric)}
            for j, p in enumerate(span.tolist()):
                assert bool(holds[layer, head, j]) == (p in rank_of)
                assert int(ranks[layer, head, j]) == rank_of.get(p, -1)
    # The protected window (last 4 tokens) is held by every head.
    assert kept.holds(torch.tensor([46, 47, 48, 49])).all()
