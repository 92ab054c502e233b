"""Chunked prefill on the real default model: parity, bounded memory, preemption, aborts.

A prompt is fed in chunks of ``prefill_chunk_size`` tokens beside other requests' decodes;
a sequence with a budget is compressed after its last chunk, and after earlier ones when the
pool needs their blocks (or after every chunk, ``prefill_compression="every-chunk"``), so a
prompt longer than the whole cache runs in the memory its budget and one chunk take.
"""

from __future__ import annotations

import pytest

from kvcompress.compress import CompressionParams
from kvcompress.engine import SamplingParams
from kvcompress.errors import KVBudgetError
from tests.engine.conftest import hf_logits, make_engine, prose_ids

FULL = CompressionParams(policy="full")
HEADS = 90  # 30 layers x 3 KV heads


def blocks(n: int) -> int:
    """A kv_cache_memory holding exactly ``n`` blocks of 16 KVs (fp32 K and V, 8 bytes of
    metric and position)."""
    return n * 8320


@pytest.fixture(scope="module")
def chunky():
    """A roomy engine that prefills 16 tokens at a time."""
    return make_engine(kv_cache_memory="256MiB", max_num_seqs=8, prefill_chunk_size=16)


def generate(engine, prompts, sampling, compression=FULL) -> tuple[dict, list[str]]:
    ids = [engine.add_request(p, sampling, compression) for p in prompts]
    done = {}
    for out in engine.run():
        if out.finished:
            done[out.request_id] = out
    return done, ids


def only(engine, prompt, sampling, compression=FULL):
    """The final output of one request run alone."""
    (out,) = generate(engine, [prompt], sampling, compression)[0].values()
    return out


def test_greedy_output_is_the_same_chunked_unchunked_and_in_transformers(
    engine, chunky, hf_default_model
):
    prompt = prose_ids(engine, 75)
    sampling = SamplingParams(max_tokens=10, ignore_eos=True)
    one_shot, chunked = only(engine, prompt, sampling), only(chunky, prompt, sampling)
    expected: list[int] = []
    for _ in range(10):
        expected.append(int(hf_logits(hf_default_model, prompt + expected)[-1].argmax()))
    assert chunked.token_ids == one_shot.token_ids == expected
    assert chunked.prompt_tokens == 75


def test_sequences_at_different_chunk_offsets_share_steps(chunky, engine):
    # 24 tokens a step: the first prompt takes a 16-token chunk, the second what is left,
    # so their chunks start at different offsets and end at different steps.
    eng = make_engine(
        kv_cache_memory="256MiB", max_num_seqs=8, prefill_chunk_size=16, max_num_batched_tokens=24
    )
    prompts = [prose_ids(engine, n, offset=500 * i) for i, n in enumerate([61, 45, 7])]
    sampling = SamplingParams(max_tokens=6, ignore_eos=True)
    together, ids = generate(eng, prompts, sampling)
    for prompt, rid in zip(prompts, ids, strict=True):
        alone, (only,) = generate(engine, [prompt], sampling)
        assert together[rid].token_ids == alone[only].token_ids
    assert eng.cache.audit().ok and eng.cache.num_free_blocks == eng.cache.num_blocks


@pytest.mark.parametrize("chunk", [64, 300])
def test_a_prompt_the_pool_holds_is_compressed_as_one_shot_compression_would(engine, chunk):
    # Compressed once after its last chunk, the prompt is ranked whole by its last window:
    # chunks of 64 (the last one 44 tokens, no shorter than the window) keep what one chunk
    # of 4096 keeps, and generate the same tokens from it.
    prompt = prose_ids(engine, 300)
    params = CompressionParams(compression_rate=4, protected_window=8, min_cache_tokens=0)
    sampling = SamplingParams(max_tokens=8, ignore_eos=True)
    results = []
    for size in (chunk, 4096):
        eng = make_engine(kv_cache_memory="128MiB", prefill_chunk_size=size)
        results.append(only(eng, prompt, sampling, params))
        assert eng.stats().compression_passes == 1
    assert results[0].token_ids == results[1].token_ids
    assert results[0].kv.kept_per_layer_head == results[1].kv.kept_per_layer_head


def test_running_requests_keep_decoding_while_a_long_prompt_prefills(chunky, engine):
    short = chunky.add_request(prose_ids(engine, 10), SamplingParams(max_tokens=40), FULL)
    chunky.step()  # its prefill
    long = chunky.add_request(
        prose_ids(engine, 160, offset=900), SamplingParams(max_tokens=2), FULL
    )
    steps_with_short = 0
    for step in range(10):  # 160 tokens in chunks of 16: ten steps of prefill
        outputs = {o.request_id: o for o in chunky.step()}
        # Nothing to report before the prefill's last chunk, which samples the first token.
        assert (long in outputs) == (step == 9)
        steps_with_short += short in outputs and len(outputs[short].new_token_ids) == 1
    assert steps_with_short == 10  # a token for the short request at every step
    rest = {o.request_id: o for o in chunky.run() if o.finished}
    assert rest[long].num_output_tokens == 2


@pytest.mark.parametrize("mode", ["when-needed", "every-chunk"])
def test_a_prompt_longer_than_the_cache_runs_in_bounded_memory(engine, mode):
    pool = 600  # about 106 uncompressed tokens per head
    eng = make_engine(kv_cache_memory=blocks(pool), prefill_chunk_size=32, prefill_compression=mode)
    prompt = prose_ids(engine, 400)
    assert eng.capacity().blocks_for(400) > pool  # it could never be prefilled whole
    params = {"max_cache_tokens": 32, "protected_window": 8}
    out = only(eng, prompt, SamplingParams(max_tokens=20, ignore_eos=True), params)
    assert out.num_output_tokens == 20 and out.finish_reason == "length"
    assert out.kv.kvs_seen == (400 + 19) * HEADS
    stats = eng.stats()
    assert stats.preemptions == 0
    if mode == "every-chunk":
        # Its budget (2 blocks per head), one chunk (2 blocks per head) and a partial block.
        assert stats.blocks_peak <= 5 * HEADS < pool
        assert stats.compression_passes >= 400 // 32
    else:
        # Chunks pile up until the next one does not fit, then the prompt is compressed.
        assert 5 * HEADS < stats.blocks_peak <= pool
        assert 1 < stats.compression_passes < 400 // 32
    assert eng.cache.audit().ok and eng.cache.num_free_blocks == pool


@pytest.mark.parametrize("swap_space", [0, "64MiB"], ids=["recompute", "swap"])
def test_preempted_compressed_requests_resume_compressed_and_reach_max_tokens(engine, swap_space):
    # Three requests at rate 4 whose budgets do not all fit at once: some are preempted,
    # then swapped back in or recomputed through the chunked, compressing prefill, and
    # still generate every token.
    eng = make_engine(
        kv_cache_memory=blocks(10 * HEADS), prefill_chunk_size=32, swap_space=swap_space
    )
    prompts = [prose_ids(engine, 40, offset=700 * i) for i in range(3)]
    params = {"compression_rate": 4, "protected_window": 8, "min_cache_tokens": 0}
    assert eng.capacity().blocks_for(40 + 150) > eng.capacity().num_blocks // 3
    done, ids = generate(eng, prompts, SamplingParams(max_tokens=150, ignore_eos=True), params)
    stats = eng.stats()
    assert stats.preemptions > 0
    assert (stats.swaps == stats.preemptions) if swap_space else (stats.swaps == 0)
    assert [done[i].num_output_tokens for i in ids] == [150, 150, 150]
    assert eng.cache.audit().ok and eng.cache.num_free_blocks == eng.cache.num_blocks


def test_abort_mid_prefill_frees_every_block(chunky, engine):
    free = chunky.cache.num_free_blocks
    rid = chunky.add_request(prose_ids(engine, 120), SamplingParams(max_tokens=4), FULL)
    chunky.step()
    chunky.step()
    assert chunky.cache.num_free_blocks < free
    assert chunky.abort_request(rid)
    assert chunky.cache.num_free_blocks == free and chunky.cache.audit().ok
    assert not chunky.has_unfinished_requests()


def test_a_budget_that_can_never_fit_is_refused_with_its_numbers(engine):
    eng = make_engine(kv_cache_memory=blocks(10 * HEADS))
    prompt = prose_ids(engine, 300)
    with pytest.raises(KVBudgetError, match=r"needs 1800 KV blocks .* holds 900") as err:
        eng.add_request(prompt, SamplingParams(max_tokens=20), FULL)  # 320 tokens uncompressed
    assert err.value.param == "prompt"
    with pytest.raises(KVBudgetError, match="holds 900"):
        eng.add_request(prompt, SamplingParams(max_tokens=20), {"max_cache_tokens": 200})
    # The same prompt with a budget that fits is accepted, although it is 3x the cache.
    eng.add_request(prompt, SamplingParams(max_tokens=1), {"max_cache_tokens": 64})
    (out,) = [o for o in eng.run() if o.finished]
    assert out.num_output_tokens == 1
