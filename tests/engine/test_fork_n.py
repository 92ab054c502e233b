"""n > 1 and best_of on the real default model: the prompt is prefilled once and the
request forks into sequences that share its (compressed) blocks."""

from __future__ import annotations

import pytest

from kvcompress.compress import CompressionParams
from kvcompress.engine import SamplingParams
from tests.engine.conftest import make_engine, prose_ids

HEADS = 90  # 30 layers x 3 KV heads
RATE4 = CompressionParams(compression_rate=4.0, protected_window=8, min_cache_tokens=0)
FULL = CompressionParams(policy="full")


def collect(engine, request_id):
    """Every choice's final output, by index; and whether the request ended last."""
    finals, last = {}, None
    for out in engine.run():
        if out.request_id == request_id:
            if out.finish_reason is not None:
                finals[out.index] = out
            last = out
    assert last is not None and last.finished
    return finals


def test_n4_at_rate_4_holds_one_prompt_plus_each_childs_new_blocks(engine):
    prompt = prose_ids(engine, 300)
    sampling = SamplingParams(max_tokens=6, temperature=1.0, seed=3, n=4, ignore_eos=True)
    rid = engine.add_request(prompt, sampling, RATE4)
    single = None
    while engine.has_unfinished_requests():
        outs = engine.step()
        stats = engine.stats()
        # Shared blocks count once: forks never look like leaks, nor hide one.
        assert stats.blocks_leaked == 0 and stats.blocks_distinct == stats.blocks_used
        if stats.running == 4 and single is None:
            # Just forked: four tables referencing one compressed prompt.
            single = stats.blocks_held // 4
            assert stats.blocks_used == single
            assert stats.blocks_shared == stats.blocks_held
        elif stats.running == 4:
            # Each child copied at most its partial tails and grew a block per head: about
            # one prompt plus the children's new blocks, not four copies.
            assert stats.blocks_used <= single + 4 * 2 * HEADS
            assert stats.blocks_held >= 4 * single > 2 * stats.blocks_used
            print(f"kv: held {stats.blocks_held} used {stats.blocks_used} prompt {single}")
        finals = [o for o in outs if o.finish_reason is not None]
        for out in finals:
            assert out.kv.blocks_shared <= out.kv.blocks
    assert single is not None and single * 3 < 300 // 16 * HEADS  # compressed ~4x
    assert engine.stats().blocks_used == 0
    assert engine.cache.audit().ok
    assert rid not in {r.request_id for r in engine.requests_in_flight()}


def test_greedy_choices_are_equal_and_seeded_ones_reproducible(engine):
    prompt = prose_ids(engine, 40)
    greedy = SamplingParams(max_tokens=5, n=3, ignore_eos=True)
    finals = collect(engine, engine.add_request(prompt, greedy, FULL))
    assert sorted(finals) == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in finals.values()}) == 1
    one = collect(engine, engine.add_request(prompt, SamplingParams(max_tokens=5), FULL))
    assert one[0].token_ids == finals[0].token_ids

    seeded = SamplingParams(max_tokens=6, temperature=1.0, seed=11, n=3, ignore_eos=True)
    a = collect(engine, engine.add_request(prompt, seeded, FULL))
    b = collect(engine, engine.add_request(prompt, seeded, FULL))
    assert [a[i].token_ids for i in range(3)] == [b[i].token_ids for i in range(3)]
    assert len({tuple(o.token_ids) for o in a.values()}) > 1  # each child its own seed
    # Child 0 is the request as n=1 would sample it.
    solo = SamplingParams(max_tokens=6, temperature=1.0, seed=11, ignore_eos=True)
    assert collect(engine, engine.add_request(prompt, solo, FULL))[0].token_ids == a[0].token_ids
    assert engine.cache.audit().ok and engine.stats().blocks_used == 0


def test_aborting_a_forked_request_mid_stream_frees_everything(engine):
    sampling = SamplingParams(max_tokens=50, temperature=1.0, seed=1, n=4, ignore_eos=True)
    rid = engine.add_request(prose_ids(engine, 100), sampling, RATE4)
    while engine.stats().running < 4:
        engine.step()
    engine.step()
    assert engine.abort_request(rid)
    assert not engine.has_unfinished_requests()
    assert engine.stats().blocks_used == 0 and engine.cache.audit().ok


def test_best_of_returns_the_n_most_likely(engine):
    sampling = SamplingParams(max_tokens=4, temperature=1.0, seed=5, n=2, best_of=4)
    rid = engine.add_request(prose_ids(engine, 30), sampling, FULL)
    outs = [o for o in engine.run() if o.request_id == rid]
    assert [o.index for o in outs] == [0, 1] and outs[-1].finished
    assert outs[0].cumulative_logprob >= outs[1].cumulative_logprob
    assert engine.stats().blocks_used == 0


@pytest.fixture(scope="module")
def tight(engine):
    """600 blocks: an n=3 request of 40 + 24 tokens passes the add-time check (540 blocks:
    the shared prompt once and what each choice adds), but its three uncompressed choices
    come to hold 720 (2 shared prompt blocks per head, 2 of their own each)."""
    return make_engine(kv_cache_memory=600 * engine.capacity().bytes_per_block, max_num_seqs=4)


def test_a_forked_child_preempted_mid_decode_is_recomputed_to_the_same_text(engine, tight):
    assert tight.capacity().num_blocks == 600
    prompt = prose_ids(engine, 40)
    sampling = SamplingParams(max_tokens=24, n=3, ignore_eos=True)
    reference = collect(engine, engine.add_request(prompt, sampling, FULL))
    rid = tight.add_request(prompt, sampling, FULL)
    before = tight.stats().preemptions
    finals, preempted_mid_decode = {}, False
    while tight.has_unfinished_requests():
        for out in tight.step():
            if out.finish_reason is not None:
                finals[out.index] = out
        assert tight.cache.audit().ok and tight.stats().blocks_leaked == 0
        # A choice that had started to generate waits again: a preempted fork.
        preempted_mid_decode |= any(
            s.status == "waiting" and s.output_tokens > 0 for s in tight.requests_in_flight()
        )
    assert preempted_mid_decode and tight.stats().preemptions > before
    assert sorted(finals) == [0, 1, 2] and rid == finals[0].request_id
    for index, out in finals.items():
        assert out.finish_reason == "length" and out.num_output_tokens == 24
        assert out.token_ids == reference[index].token_ids
    assert tight.stats().blocks_used == 0 and tight.cache.audit().ok


def test_a_sampling_failure_at_the_fork_ends_the_request_and_every_choice(engine, monkeypatch):
    """Forks are registered before the first sample: if sampling fails, they end too."""

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    sampling = SamplingParams(max_tokens=5, temperature=1.0, seed=2, n=3)
    rid = engine.add_request(prose_ids(engine, 40), sampling, RATE4)
    with monkeypatch.context() as patch:
        patch.setattr(type(engine.sampler), "__call__", boom)
        outs = [o for o in engine.step() if o.request_id == rid]
    assert outs and outs[-1].finished and outs[-1].finish_reason == "error"
    assert not engine.has_unfinished_requests() and not engine.abort_request(rid)
    assert engine.stats().blocks_used == 0 and engine.cache.audit().ok
