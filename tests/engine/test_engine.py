"""The engine on the real default model: parity, batching under a budget, preemption."""

from __future__ import annotations

import pytest
import torch

from kvcompress.compress import CompressionParams
from kvcompress.engine import SamplingParams
from tests.engine.conftest import hf_logits, make_engine, prose_ids

FULL = CompressionParams(policy="full")


def test_paged_cache_logits_match_transformers(engine, hf_default_model):
    """Prefill then token-by-token decode through the paged cache equals a full forward."""
    ids = prose_ids(engine, 96)
    ours = engine.teacher_force(ids[:64], ids[64:], FULL).logits
    theirs = hf_logits(hf_default_model, ids)[63:-1]
    assert torch.allclose(ours, theirs, atol=2e-3, rtol=1e-3), (ours - theirs).abs().max()
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_greedy_generation_matches_transformers(engine, hf_default_model):
    ids = engine.apply_chat_template([{"role": "user", "content": "Name a large animal."}])
    engine.add_request(ids, SamplingParams(max_tokens=24, ignore_eos=True), FULL)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.finished]
    # Plain greedy in transformers (its min_new_tokens would mask EOS; ignore_eos does not).
    expected: list[int] = []
    for _ in range(24):
        expected.append(int(hf_logits(hf_default_model, ids + expected)[-1].argmax()))
    assert outputs[0].token_ids == expected


def test_mixed_batch_on_a_tight_budget_completes_and_frees_everything():
    # 150 blocks of 16 tokens per (layer, head): about two of these requests at a time.
    eng = make_engine(kv_cache_memory=90 * 16 * 8320 // 10 * 10, max_num_seqs=8)
    prompts = [prose_ids(eng, n, offset=200 * i) for i, n in enumerate([40, 120, 7, 200, 64, 90])]
    ids = [
        eng.add_request(p, SamplingParams(max_tokens=12, ignore_eos=True), FULL) for p in prompts
    ]
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    assert set(done) == set(ids)
    assert all(len(o.token_ids) == 12 and o.finish_reason == "length" for o in done.values())
    assert eng.cache.num_free_blocks == eng.cache.num_blocks
    assert eng.cache.num_free_seq_slots == 8


def test_request_larger_than_the_whole_budget_is_refused():
    eng = make_engine(kv_cache_memory=90 * 4 * 8320, max_num_seqs=2)
    with pytest.raises(ValueError, match="whole KV cache"):
        eng.add_request(list(range(100, 200)))
    assert not eng.has_unfinished_requests()


def test_bad_requests_are_refused_clearly(engine):
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([])
    with pytest.raises(ValueError, match="context"):
        engine.add_request([5] * (engine.max_model_len + 1))
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request([10**9])
    with pytest.raises(ValueError, match="unknown compression"):
        engine.add_request("hi", compression={"ratio": 3})
    with pytest.raises(ValueError, match="compression_rate"):
        engine.add_request("hi", compression={"compression_rate": 0.3})
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("swap_space", [0, "64MiB"], ids=["recompute", "swap"])
def test_preemption_and_resumption_give_the_same_greedy_output(engine, swap_space):
    prompts = [prose_ids(engine, 60, offset=300 * i) for i in range(3)]
    sampling = SamplingParams(max_tokens=40, ignore_eos=True)
    alone = []
    for p in prompts:
        engine.add_request(p, sampling, FULL)
        while engine.has_unfinished_requests():
            alone += [o.token_ids for o in engine.step() if o.finished]
    # Room for the three prompts, not for all three to grow by 40 tokens; no headroom
    # reserved at admission, so that the pool does run short.
    tight = make_engine(
        kv_cache_memory=90 * 14 * 8320, max_num_seqs=4, decode_headroom=0, swap_space=swap_space
    )
    ids = [tight.add_request(p, sampling, FULL) for p in prompts]
    done = {}
    while tight.has_unfinished_requests():
        done |= {o.request_id: o.token_ids for o in tight.step() if o.finished}
    stats = tight.stats()
    assert stats.preemptions > 0
    assert [done[i] for i in ids] == alone
    assert tight.cache.num_free_blocks == tight.cache.num_blocks
    if swap_space:  # every preempted request swapped out and back: no prompt fed twice
        assert stats.swaps == stats.preemptions and stats.swapped_bytes == 0
        assert stats.prompt_tokens == sum(len(p) for p in prompts)
    else:  # recomputed: the prompt and the output so far fed again
        assert stats.swaps == 0 and stats.prompt_tokens > sum(len(p) for p in prompts)


def test_abort_frees_blocks(engine):
    rid = engine.add_request(prose_ids(engine, 50), SamplingParams(max_tokens=100), FULL)
    engine.step()
    assert engine.cache.num_free_blocks < engine.cache.num_blocks
    assert engine.abort_request(rid)
    assert engine.cache.num_free_blocks == engine.cache.num_blocks
    assert not engine.abort_request(rid)


def test_engine_defaults_apply_when_a_request_gives_none():
    eng = make_engine(
        kv_cache_memory="64MiB",
        compression=CompressionParams(compression_rate=4, protected_window=8, min_cache_tokens=0),
    )
    rid = eng.add_request(prose_ids(eng, 400), SamplingParams(max_tokens=2))
    final = None
    while eng.has_unfinished_requests():
        final = next((o for o in eng.step() if o.request_id == rid and o.finished), final)
    kv = final.kv
    assert kv.compression_rate > 3
    # Each head wastes at most the unused tail of its last block.
    assert kv.kvs_kept <= kv.physical_kvs <= kv.kvs_kept + 90 * (kv.block_size - 1)


def test_stop_strings_and_eos(engine):
    ids = engine.apply_chat_template([{"role": "user", "content": "Count from 1 to 20."}])
    engine.add_request(ids, SamplingParams(max_tokens=60, stop=("5",)), FULL)
    out = []
    while engine.has_unfinished_requests():
        out += [o for o in engine.step() if o.finished]
    assert out[0].finish_reason == "stop" and "5" not in out[0].text


def test_suffix_fed_after_prefill_matches_one_prompt_without_compression(engine):
    context = prose_ids(engine, 80)
    question = engine.tokenizer("\n\nIn one word, the topic is", add_special_tokens=False)
    question = question["input_ids"]
    sampling = SamplingParams(max_tokens=8, ignore_eos=True)
    results = []
    for prompt, suffix in [(context + question, None), (context, question)]:
        engine.add_request(prompt, sampling, FULL, suffix=suffix)
        while engine.has_unfinished_requests():
            results += [o for o in engine.step() if o.finished]
    assert results[0].token_ids == results[1].token_ids
    assert results[1].prompt_tokens == len(context) + len(question)


def test_compression_after_teacher_forcing_still_works(engine):
    """Scratch buffers first made under teacher forcing's inference mode are reused by the
    scheduler's compression outside it."""
    ids = prose_ids(engine, 200)
    engine.teacher_force(
        ids[:150], ids[150:160], CompressionParams(compression_rate=4, min_cache_tokens=0)
    )
    engine.add_request(
        ids, SamplingParams(max_tokens=3), CompressionParams(compression_rate=4, min_cache_tokens=0)
    )
    finals = []
    while engine.has_unfinished_requests():
        finals += [o for o in engine.step() if o.finished]
    assert finals[0].kv.compression_rate > 2


def test_a_request_keeps_engine_defaults_it_does_not_give_and_can_clear_them():
    eng = make_engine(
        kv_cache_memory="64MiB",
        compression=CompressionParams(
            compression_rate=4, protected_window=8, compression_interval=2, min_cache_tokens=0
        ),
    )
    # A whole CompressionParams overrides only the fields it was given.
    params = eng.resolve_compression(CompressionParams(sinks=4))
    assert (params.compression_rate, params.protected_window, params.sinks) == (4, 8, 4)
    assert params.compression_interval == 2
    # null clears a nullable default; giving the other budget replaces the rate.
    params = eng.resolve_compression({"compression_interval": None, "max_cache_tokens": 64})
    assert params.compression_interval is None and params.compression_rate is None
    assert params.max_cache_tokens == 64 and params.protected_window == 8
    rid = eng.add_request(
        prose_ids(eng, 300), SamplingParams(max_tokens=6), {"compression_interval": None}
    )
    final = next(o for o in eng.run() if o.request_id == rid and o.finished)
    assert final.kv.compressions == 1  # after prefill only: the interval was cleared
    rid = eng.add_request(prose_ids(eng, 300), SamplingParams(max_tokens=6, ignore_eos=True))
    final = next(o for o in eng.run() if o.request_id == rid and o.finished)
    assert final.kv.compressions > 1  # the engine default interval applies


def test_memory_figures_come_from_the_block_tables_and_the_pool(engine):
    """Inject a leak of each kind; the statistics must see it."""
    cache = engine.cache
    rid = engine.add_request(prose_ids(engine, 40), SamplingParams(max_tokens=50), FULL)
    engine.step()
    stats = engine.stats()
    assert stats.blocks_used == stats.blocks_held == 90 * 3  # 40 tokens: 3 blocks per head
    (state,) = engine.requests_in_flight()
    assert state.request_id == rid and state.status == "running"
    # A block handed out by the pool that no request references.
    orphan = cache.pool.allocate(1)
    stats = engine.stats()
    assert stats.blocks_leaked == 1
    cache.pool.free(orphan)
    # A block held by a head past what its length needs.
    slot = engine._requests[rid][0].slot
    extra = cache.pool.allocate(1)
    cache.block_tables[0, slot, 0, 3] = extra[0]
    kv = engine.kv_stats(engine._requests[rid][0])
    assert kv.blocks == 90 * 3 + 1 and kv.physical_over_theoretical > 1
    assert engine.stats().blocks_used == engine.stats().blocks_held
    assert engine.abort_request(rid)  # frees every block its tables reference, the extra too
    assert cache.num_free_blocks == cache.num_blocks
