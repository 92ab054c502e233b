"""Every scorer, selected per request, frees real blocks through the engine's public API."""

from __future__ import annotations

import math

import pytest
import torch

from kvcompress.compress import SCORERS
from kvcompress.engine import SamplingParams

PROMPT = (
    "The museum opened its new wing on a rainy Tuesday. Visitors lined up early to see the "
    "collection of old maps, ship models and letters written by sailors. The secret code is "
    "1585963. A guide explained how each map was drawn by hand and copied many times. "
) * 3


@pytest.mark.parametrize("scorer", list(SCORERS))
def test_each_scorer_compresses_to_the_budget_and_returns_blocks(engine, scorer):
    ids = engine.tokenize(PROMPT)
    free = engine.capacity().free_blocks
    compression = {"max_cache_tokens": 48, "protected_window": 8, "scorer": scorer}
    result = engine.teacher_force(ids, ids[:1], compression)
    cap = engine.capacity()
    allowed = math.ceil(48 * cap.heads / cap.block_size)
    assert result.kv.blocks == allowed  # global selection frees exactly down to the budget
    assert result.kv.kvs_kept <= 48 * cap.heads < len(ids) * cap.heads
    if scorer != "position":  # every head holds the same positions: equal shares
        assert len({n for row in result.kv.kept_per_layer_head for n in row}) > 1
    assert engine.capacity().free_blocks == free  # all returned when the request ends


def held_keys(cache, layer: int, slot: int, head: int) -> torch.Tensor:
    """The keys one head holds, in block-table order, read through its table and length."""
    n = int(cache.context_lens[layer, slot, head])
    bs = cache.block_size
    blocks = cache.block_tables[layer, slot, head, : -(-n // bs)]
    flat = (blocks.view(-1, 1) * bs + torch.arange(bs)).reshape(-1)[:n]
    return cache.k_pool.view(-1, cache.head_dim)[flat].float()


def test_last_query_ranks_by_the_newest_querys_attention_after_prefill_and_decode(
    engine, monkeypatch
):
    """At every compression (after each prefill chunk, then after decode steps) of a
    last-query request, running beside a window-scored one, its scores are the newest
    token's query (as the model handed it to the backend) softmaxed against each head's
    kept keys and summed over the GQA group (unpooled, as the request asks)."""
    cache, mc = engine.cache, engine.model_config
    group = mc.num_heads // mc.num_kv_heads
    newest: dict[int, list[torch.Tensor]] = {}  # cache slot -> that step's query per layer
    real_forward = engine.backend.forward

    def recording(layer, q, k, v, meta):
        if layer == 0:
            newest.clear()
        ends = torch.tensor(meta.query_lens).cumsum(0) - 1
        for slot, row in zip(meta.seq_slots.tolist(), ends.tolist(), strict=True):
            newest.setdefault(slot, []).append(q[row].float().clone())
        return real_forward(layer, q, k, v, meta)

    checked = []
    real_compress = engine.compressor.compress

    def checking(seq_slots, params, inputs=None):
        for i, (slot, p) in enumerate(zip(seq_slots, params, strict=True)):
            if p.effective_scorer != "last-query":
                continue
            slots = torch.tensor([slot])
            view = cache.head_view(slots)
            # In inference mode, as the compressor runs: its workspace buffers may be
            # inference tensors already (made by an earlier test's compression).
            with torch.inference_mode():
                scores = engine.compressor.scores(slots, view, [p], inputs.select([i]))[0]
            queries = newest[slot]
            for layer in range(mc.num_layers):
                for h in range(mc.num_kv_heads):
                    keys = held_keys(cache, layer, slot, h)
                    q = queries[layer][h * group : (h + 1) * group]  # [G, D]
                    expected = torch.softmax(q @ keys.T * mc.head_dim**-0.5, -1).sum(0)
                    got = scores[layer * mc.num_kv_heads + h, : keys.shape[0]]
                    finite = torch.isfinite(got)  # not the protected window
                    assert int(finite.sum()) > 0
                    torch.testing.assert_close(got[finite], expected[finite], atol=1e-5, rtol=1e-4)
            checked.append(int(cache.seq_lens[slot]))
        return real_compress(seq_slots, params, inputs)

    monkeypatch.setattr(engine.backend, "forward", recording)
    monkeypatch.setattr(engine.compressor, "compress", checking)
    # A compression after a chunk that is not the prompt's last, too.
    monkeypatch.setattr(engine.scheduler.config, "prefill_compression", "every-chunk")
    free = engine.capacity().free_blocks
    sampling = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    engine.add_request(PROMPT, SamplingParams(max_tokens=6), {"max_cache_tokens": 48})
    long_prompt = engine.tokenize(PROMPT * 3)
    assert len(long_prompt) > engine.scheduler.chunk_size  # two chunks
    compression = {
        "max_cache_tokens": 48,
        "protected_window": 8,
        "scorer": "last-query",
        "compression_interval": 1,
        "pool_kernel": 1,  # the softmax itself (the pooling is tested in compress/)
    }
    engine.add_request(long_prompt, sampling, compression)
    finals = [o for o in engine.run() if o.finished]
    n = len(long_prompt)
    # After each chunk (the last one holds the 32-token observation window), then after two
    # decode steps (the step sampling the fourth token ends the request instead).
    assert checked == [n - 32, n, n + 1, n + 2]
    last = next(o for o in finals if o.prompt_tokens == n)
    assert last.kv.kvs_kept <= 48 * engine.capacity().heads < last.kv.kvs_seen
    assert engine.capacity().free_blocks == free


@pytest.mark.parametrize("scorer", ["key-norm", "expected-attention"])
def test_context_compressed_by_a_query_agnostic_scorer_before_its_question(engine, scorer):
    free = engine.capacity().free_blocks
    engine.add_request(
        PROMPT,
        SamplingParams(max_tokens=4, temperature=0.0),
        {"max_cache_tokens": 48, "protected_window": 8, "scorer": scorer},
        suffix=" What is the secret code? The secret code is",
    )
    final = [o for o in engine.run() if o.finished]
    assert len(final) == 1 and final[0].finish_reason == "length"
    assert final[0].kv.compressions == 1
    assert final[0].kv.kvs_kept < final[0].kv.kvs_seen / 2
    assert engine.capacity().free_blocks == free


def test_last_query_choices_of_a_forked_request_each_compress(engine):
    """n=2: the choices fork after the prefill (each from its parent's newest query) and
    each compresses on its own every decode step, freeing real blocks."""
    free = engine.capacity().free_blocks
    compression = {
        "max_cache_tokens": 48,
        "protected_window": 8,
        "scorer": "last-query",
        "compression_interval": 1,
    }
    sampling = SamplingParams(n=2, max_tokens=4, temperature=1.0, seed=1, ignore_eos=True)
    engine.add_request(PROMPT, sampling, compression)
    finals = [o for o in engine.run() if o.finished or o.finish_reason]
    assert sorted(o.index for o in finals) == [0, 1]
    for out in finals:
        assert out.kv.compressions >= 3  # after the prefill, then after decode steps
        assert out.kv.kvs_kept <= 48 * engine.capacity().heads < out.kv.kvs_seen
    assert engine.capacity().free_blocks == free
