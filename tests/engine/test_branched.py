"""Branched prompts on the real default model: one prefill, uncompressed, then one request
per set of compression parameters, each compressed exactly as if it had run alone with a
prefill chunk covering its whole prompt."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcompress.compress import exact_rates
from kvcompress.engine import SamplingParams
from kvcompress.errors import InvalidParameterError, KVBudgetError
from tests.engine.conftest import prose_ids

GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)


def rates(policy: str, *values: float):
    return [exact_rates(policy=policy, compression_rate=r, protected_window=8) for r in values]


# Two prefill signatures: L2 (kvcompress, uniform; streaming reads no metric and joins it)
# and L1 (h2o).
L2_GROUP = rates("kvcompress", 4, 8) + rates("uniform", 4, 8) + rates("streaming", 4, 8)
L1_GROUP = rates("h2o", 4, 8)


def finals(engine) -> dict:
    """Every request's final output, by id, once the engine has run dry."""
    done = {o.request_id: o for o in engine.run() if o.finished}
    assert engine.stats().blocks_used == 0 and engine.cache.audit().ok
    return done


def alone(engine, prompt, params, sampling=GREEDY, suffix=None):
    rid = engine.add_request(prompt, sampling, params, suffix=suffix)
    return finals(engine)[rid]


@pytest.fixture
def small_chunks(engine):
    """The engine with 64-token prefill chunks for one test: branched prompts ignore them."""
    scheduler = engine.scheduler
    chunk = scheduler.chunk_size
    scheduler.chunk_size = 64
    yield engine
    scheduler.chunk_size = chunk


def test_each_branch_equals_its_request_alone_with_a_one_shot_prefill(engine, small_chunks):
    prompt = prose_ids(engine, 200)
    branched = {}
    for group in (L2_GROUP, L1_GROUP):
        ids = engine.add_branched_request(prompt, GREEDY, group)
        out = finals(engine)
        branched.update({i: out[i] for i in ids})
    engine.scheduler.chunk_size = 512  # alone, the whole prompt in one chunk
    kept = {}
    for rid, params in zip(branched, L2_GROUP + L1_GROUP, strict=True):
        want, got = alone(engine, prompt, params), branched[rid]
        assert got.token_ids == want.token_ids, params.policy
        assert got.kv.kept_per_layer_head == want.kv.kept_per_layer_head, params.policy
        assert got.kv.compressions == want.kv.compressions == 1
        kept[params.policy, params.compression_rate] = got.kv.kept_per_layer_head
    # KV-Compress spreads its budget unevenly over the heads, the others evenly: the
    # branches really are compressed differently.
    assert kept["kvcompress", 8] != kept["uniform", 8] == kept["h2o", 8]


def test_a_suffix_is_fed_to_each_branch_after_its_compression(engine):
    context, question = prose_ids(engine, 150), prose_ids(engine, 6, offset=5000)
    params = rates("kvcompress", 4) + rates("streaming", 8)
    ids = engine.add_branched_request(context, GREEDY, params, suffix=question)
    out = finals(engine)
    for rid, p in zip(ids, params, strict=True):
        want = alone(engine, context, p, suffix=question)
        assert out[rid].token_ids == want.token_ids
        assert out[rid].kv.kept_per_layer_head == want.kv.kept_per_layer_head


def test_a_last_query_branch_gets_the_prompts_newest_query(engine):
    prompt = prose_ids(engine, 150)
    params = [
        exact_rates(compression_rate=4, protected_window=8, scorer="last-query"),
        *rates("streaming", 4),
    ]
    ids = engine.add_branched_request(prompt, GREEDY, params)
    out = finals(engine)
    want = alone(engine, prompt, params[0])
    assert out[ids[0]].token_ids == want.token_ids
    assert out[ids[0]].kv.kept_per_layer_head == want.kv.kept_per_layer_head
    assert out[ids[0]].kv.kept_per_layer_head != out[ids[1]].kv.kept_per_layer_head


def test_one_prefill_holds_the_prompt_once_until_the_branches_compress(engine):
    prompt = prose_ids(engine, 320)  # 20 blocks per head
    heads = engine.capacity().heads
    engine.reset_peak_memory()
    ids = engine.add_branched_request(prompt, GREEDY, L2_GROUP, request_ids=list("abcdef"))
    assert ids == list("abcdef")
    assert [s.request_id for s in engine.requests_in_flight()] == ids
    engine.step()  # prefill, fork and compress in one step
    stats = engine.stats()
    assert stats.running == 6 and stats.prompt_tokens >= 320
    # Six compressed branches (rates 4 and 8), not six uncompressed prompts.
    assert stats.blocks_used < 2 * 20 * heads
    assert stats.blocks_peak < 3 * 20 * heads
    finals(engine)


def test_branches_needing_different_prefills_are_refused(engine):
    with pytest.raises(InvalidParameterError, match=r"kvcompress needs the L2 .* h2o needs the L1"):
        engine.add_branched_request([1, 2, 3], GREEDY, L2_GROUP + L1_GROUP)
    with pytest.raises(InvalidParameterError) as err:
        engine.add_branched_request([1, 2, 3], SamplingParams(n=2), L1_GROUP)
    assert err.value.param == "n"
    with pytest.raises(InvalidParameterError, match="at least one branch"):
        engine.add_branched_request([1, 2, 3], GREEDY, [])
    assert not engine.has_unfinished_requests()


def test_a_prompt_whose_uncompressed_prefill_cannot_fit_is_refused(engine):
    prompt = [100] * 8000  # about 45000 blocks uncompressed, in a cache of about 32000
    params = rates("kvcompress", 8)
    # Alone it compresses chunk by chunk and fits; branched, it is prefilled whole.
    rid = engine.add_request(prompt, GREEDY, params[0])
    assert engine.abort_request(rid)
    with pytest.raises(KVBudgetError, match=r"8000-token prompt uncompressed"):
        engine.add_branched_request(prompt, GREEDY, params)
    assert not engine.has_unfinished_requests()


def test_aborting_branches_before_and_after_the_prefill_frees_everything(engine):
    prompt = prose_ids(engine, 150)
    sampling = SamplingParams(max_tokens=20, ignore_eos=True)
    # Before the prefill: the others still run; the last abort drops the prefill.
    ids = engine.add_branched_request(prompt, sampling, L2_GROUP[:3])
    assert engine.abort_request(ids[1])
    assert [s.request_id for s in engine.requests_in_flight()] == [ids[0], ids[2]]
    out = finals(engine)
    assert sorted(out) == [ids[0], ids[2]]
    assert all(o.num_output_tokens == 20 for o in out.values())
    ids = engine.add_branched_request(prompt, sampling, L1_GROUP)
    assert all(engine.abort_request(i) for i in ids)
    assert not engine.has_unfinished_requests() and finals(engine) == {}
    # Mid-stream: one branch, then all the others.
    ids = engine.add_branched_request(prompt, sampling, L2_GROUP)
    for _ in range(3):
        engine.step()
    assert engine.abort_request(ids[0]) and not engine.abort_request(ids[0])
    engine.step()
    assert engine.cache.audit().ok
    for rid in ids[1:]:
        assert engine.abort_request(rid)
    assert not engine.has_unfinished_requests()
    assert engine.stats().blocks_used == 0 and engine.cache.audit().ok


@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    picks=st.lists(st.integers(0, len(L2_GROUP) - 1), min_size=1, max_size=4, unique=True),
    aborts=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5)), max_size=4),
)
def test_random_branches_and_aborts_leak_nothing(engine, picks, aborts):
    """Branches of a random subset, aborted at random steps (before the prefill too):
    every survivor reaches max_tokens, and every block returns to the pool."""
    sampling = SamplingParams(max_tokens=6, ignore_eos=True)
    ids = engine.add_branched_request(prose_ids(engine, 90), sampling, [L2_GROUP[i] for i in picks])
    at = {}
    for which, step in aborts:
        at.setdefault(step, set()).add(ids[which % len(ids)])
    aborted, done, step = set(), {}, 0
    while engine.has_unfinished_requests() or step in at:
        for rid in at.get(step, ()):
            if rid not in done and rid not in aborted:
                assert engine.abort_request(rid)
                aborted.add(rid)
        done.update({o.request_id: o for o in engine.step() if o.finished})
        assert engine.cache.audit().ok and engine.stats().blocks_leaked == 0
        step += 1
    assert set(done) == set(ids) - aborted
    assert all(o.num_output_tokens == 6 for o in done.values())
    assert engine.stats().blocks_used == 0


def test_a_failed_prefill_step_ends_every_branch_with_an_error(engine, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    ids = engine.add_branched_request(prose_ids(engine, 40), GREEDY, L1_GROUP)
    with monkeypatch.context() as patch:
        patch.setattr(engine.runner, "run", boom)
        outs = engine.step()
    assert sorted(o.request_id for o in outs) == sorted(ids)
    assert all(o.finished and o.finish_reason == "error" for o in outs)
    assert not engine.has_unfinished_requests() and not engine.abort_request(ids[0])
    assert engine.stats().blocks_used == 0 and engine.cache.audit().ok
