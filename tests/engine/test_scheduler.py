"""Chunked prefill, admission, compression triggers and preemption, driven without a model.

A fake step does what the model runner does to the cache (``prepare_append`` for the batch,
then a random metric for the new KVs) and what the engine does to the sequences (computed
tokens advance; one output token for each that samples, then ``after_step``). A thin
``Compressor`` subclass records every call, with the scheduler's state at that moment, and
then compresses for real.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from kvcompress.cache import CacheConfig, PagedKVCache
from kvcompress.compress import CompressionParams, Compressor
from kvcompress.engine.config import EngineConfig
from kvcompress.engine.kept_queries import KeptQueries
from kvcompress.engine.last_queries import LastQueries
from kvcompress.engine.sampling import SamplingParams
from kvcompress.engine.scheduler import ScheduledBatch, Scheduler
from kvcompress.engine.sequence import Sequence, SequenceStatus
from kvcompress.engine.window_queries import WindowQueries
from kvcompress.models.rope import RotaryEmbedding

LAYERS, HEADS, BS = 1, 2, 2  # 2 (layer, head) rows per sequence


class Call(NamedTuple):
    phase: str  # "schedule" (memory short) or "after" (a trigger after a step)
    step: int
    slots: list[int]
    preemptions: int  # preemptions the scheduler had made when compression was called
    running: list[int]  # slots running at that moment
    short: bool  # whether the running sequences' next decode did not fit


class SpyCompressor(Compressor):
    def __init__(self, cache: PagedKVCache) -> None:
        super().__init__(cache)
        self.calls: list[Call] = []
        self.scheduler: Scheduler | None = None
        self.phase = ("", 0)

    def compress(self, seq_slots, params, *args, **kwargs):
        sched = self.scheduler
        assert sched is not None
        running = [s.slot for s in sched.running]
        self.calls.append(
            Call(*self.phase, list(seq_slots), sched.preemptions, running, short(sched))
        )
        return super().compress(seq_slots, params, *args, **kwargs)


def short(sched: Scheduler) -> bool:
    slots = torch.tensor([s.slot for s in sched.running if s.prefilled], dtype=torch.long)
    need = sched.cache.blocks_needed(slots, torch.ones(len(slots), dtype=torch.long))
    return need > sched.cache.num_free_blocks


class Harness:
    def __init__(self, blocks: int, **engine_kwargs) -> None:
        cfg = CacheConfig(
            num_layers=LAYERS,
            num_kv_heads=HEADS,
            head_dim=2,
            block_size=BS,
            kv_cache_memory=blocks * BS * (2 * 2 * 4 + 8),
            max_seqs=8,
            max_model_len=256,
        )
        self.cache = PagedKVCache(cfg)
        assert self.cache.num_blocks == blocks
        self.spy = SpyCompressor(self.cache)
        self.config = EngineConfig(block_size=BS, **engine_kwargs)
        self.sched = Scheduler(self.config, self.cache, self.spy)
        self.spy.scheduler = self.sched
        self.gen = torch.Generator().manual_seed(0)
        self.steps = 0

    def add(self, name: str, prompt_len: int, max_tokens: int = 128, **compression) -> Sequence:
        # These prompts are tiny: no floor under a rate's budget unless a test sets one.
        compression.setdefault("min_cache_tokens", 0)
        sampling = SamplingParams(max_tokens=max_tokens)
        seq = Sequence(name, list(range(prompt_len)), sampling, CompressionParams(**compression))
        self.sched.add(seq)
        return seq

    def step(self) -> ScheduledBatch | None:
        """One engine step; ``step`` counts steps from 1."""
        self.steps += 1
        self.spy.phase = ("schedule", self.steps)
        batch = self.sched.schedule()
        if batch is None or not batch.seqs:
            return batch
        slots = torch.tensor([s.slot for s in batch.seqs])
        plan = self.cache.prepare_append(slots, torch.tensor(batch.num_tokens))
        new = plan.slots.reshape(-1)
        self.cache.metric.view(-1)[new] = torch.rand(new.numel(), generator=self.gen)
        for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
            seq.num_computed += n
        for i in batch.sample:
            batch.seqs[i].output_token_ids.append(0)
        self.spy.phase = ("after", self.steps)
        self.sched.after_step(batch)
        assert self.cache.audit().ok
        return batch

    def calls(self, phase: str) -> list[tuple[int, list[int]]]:
        return [(c.step, c.slots) for c in self.spy.calls if c.phase == phase]


def is_prefill(batch: ScheduledBatch) -> bool:
    return batch.num_decode == 0 and len(batch.seqs) > 0


def is_decode(batch: ScheduledBatch) -> bool:
    return batch.num_decode == len(batch.seqs) > 0


def kept(cache: PagedKVCache, seq: Sequence) -> int:
    return int(cache.context_lens[:, seq.slot].sum())


def test_engine_config_fields_the_scheduler_reads():
    config = EngineConfig(max_num_seqs=3, max_num_batched_tokens=40, block_size=BS)
    assert (config.max_num_seqs, config.max_num_batched_tokens, config.block_size) == (3, 40, BS)
    assert not config.compression.evicts  # engine default: compression off


def test_prefill_is_followed_by_compression_of_the_evicting_sequences_only():
    h = Harness(blocks=256, decode_headroom=0)
    a = h.add("a", 20, compression_rate=2.0, protected_window=2)
    b = h.add("b", 20)  # no budget
    c = h.add("c", 20, policy="full", compression_rate=4.0)  # a policy that never evicts
    d = h.add("d", 20, max_cache_tokens=4, protected_window=2)
    batch = h.step()
    assert batch.num_decode == 0 and batch.seqs == [a, b, c, d]
    assert h.calls("schedule") == []
    assert h.calls("after") == [(1, [a.slot, d.slot])]
    assert (a.compressions, b.compressions, c.compressions, d.compressions) == (1, 0, 0, 1)
    assert kept(h.cache, a) < 20 * LAYERS * HEADS
    assert kept(h.cache, d) <= 4 * LAYERS * HEADS
    assert kept(h.cache, b) == kept(h.cache, c) == 20 * LAYERS * HEADS
    assert h.sched.compression_passes == 1


def test_compression_interval_compresses_exactly_every_k_decode_steps():
    h = Harness(blocks=512)
    common = dict(compression_rate=2.0, protected_window=2)
    a = h.add("a", 12, compression_interval=3, **common)
    b = h.add("b", 12, compression_interval=2, **common)
    c = h.add("c", 12, **common)  # only after prefill
    h.step()
    decode_steps = 12
    for _ in range(decode_steps):
        assert is_decode(h.step())
    assert h.calls("schedule") == []  # the pool is roomy: no trigger from memory
    expected = [(1, [a.slot, b.slot, c.slot])]
    for n in range(1, decode_steps + 1):
        due = [s.slot for s, k in ((a, 3), (b, 2)) if n % k == 0]
        if due:
            expected.append((n + 1, due))
    assert h.calls("after") == expected
    assert (a.compressions, b.compressions, c.compressions) == (1 + 4, 1 + 6, 1)
    assert (a.steps_since_compression, b.steps_since_compression) == (0, 0)
    assert c.steps_since_compression == decode_steps


def test_compress_once_compresses_only_after_prefill():
    h = Harness(blocks=512)
    common = dict(compression_rate=2.0, protected_window=2, compression_interval=1)
    once = h.add("once", 12, compress_once=True, **common)
    every = h.add("every", 12, **common)
    for _ in range(6):
        h.step()
    calls = h.calls("after")
    assert calls[0] == (1, [once.slot, every.slot])
    assert calls[1:] == [(n, [every.slot]) for n in range(2, 7)]
    assert once.compressions == 1 and not once.may_compress


def test_short_pool_compresses_instead_of_preempting():
    # Each prompt needs 8 blocks per row pair; compressed to 4 KVs per head they hold 4 blocks
    # and then grow by 2 blocks every other decode step until the pool runs short.
    h = Harness(blocks=36)
    a = h.add("a", 16, max_cache_tokens=4, protected_window=2)
    b = h.add("b", 16, max_cache_tokens=4, protected_window=2)
    assert is_prefill(h.step())
    first_short = None
    for _ in range(40):
        if first_short is None and short(h.sched):
            first_short = h.steps + 1
        assert is_decode(h.step())
    assert first_short is not None, "the pool never ran short: the test proves nothing"
    shortage_calls = h.calls("schedule")
    assert shortage_calls and shortage_calls[0] == (first_short, [a.slot, b.slot])
    assert all(c.short for c in h.spy.calls if c.phase == "schedule")
    assert h.sched.preemptions == 0
    assert h.sched.running == [a, b]
    assert h.calls("after") == [(1, [a.slot, b.slot])]  # no interval: prefill only


def preempting_c(**engine_kwargs) -> tuple[Harness, Sequence, Sequence, Sequence]:
    """a may compress but is within its budget (frees nothing); b and c never compress.
    c is admitted a step after a and b (the batch token cap), beside their decodes; at the
    fourth step a and b need a block per head for their 7th token (4 blocks, 2 free)."""
    h = Harness(blocks=20, max_num_batched_tokens=8, decode_headroom=0, **engine_kwargs)
    a = h.add("a", 4, max_cache_tokens=100)
    b = h.add("b", 4)
    c = h.add("c", 4, policy="full", compression_rate=8.0)
    assert h.step().seqs == [a, b]
    batch = h.step()  # a and b decode their 5th token; c's prompt fits beside them
    assert batch.seqs == [a, b, c] and batch.num_decode == 2 and batch.num_tokens == [1, 1, 4]
    assert is_decode(h.step())
    assert short(h.sched)
    return h, a, b, c


@pytest.mark.parametrize("swap", [False, True], ids=["recompute", "swap"])
def test_preemption_only_after_compression_falls_short_and_takes_the_latest_admitted(swap):
    h, a, b, c = preempting_c(swap_space="1MiB" if swap else 0)
    running = [a.slot, b.slot, c.slot]
    held = h.cache.blocks_held(c.slot)
    state = (c.num_computed, c.prefilled, c.compressions, c.steps_since_compression)
    batch = h.step()
    assert is_decode(batch) and batch.seqs == [a, b]
    calls = [c_ for c_ in h.spy.calls if c_.phase == "schedule"]
    assert len(calls) == 1
    assert calls[0].slots == [a.slot]
    assert calls[0].preemptions == 0 and calls[0].short
    assert calls[0].running == running
    # Freeing c was enough: b stays.
    assert h.sched.preemptions == 1 and c.preemptions == 1
    assert c.status is SequenceStatus.WAITING and c.slot is None
    assert h.sched.waiting[0] is c
    assert h.sched.running == [a, b]
    if swap:  # on the host, to resume where it was
        assert h.sched.swaps == 1 and c.swapped.num_blocks == held
        assert h.sched.swapped_bytes == c.swapped.nbytes > 0
        assert (c.num_computed, c.prefilled, c.compressions, c.steps_since_compression) == state
    else:  # recomputed from its first token
        assert h.sched.swaps == 0 and c.swapped is None
        assert (c.num_computed, c.prefilled) == (0, False)
        assert (c.compressions, c.steps_since_compression) == (0, 0)


def test_a_swapped_out_sequence_comes_back_once_its_blocks_fit_and_decodes_on():
    h, a, _, c = preempting_c(swap_space="1MiB")
    h.step()  # c is swapped out
    computed = c.num_computed
    assert c.swapped is not None
    h.sched.finish(a)
    batch = h.step()  # a's blocks free: c returns and decodes in the same step
    assert c.swapped is None and c.slot is not None and h.sched.swapped_bytes == 0
    assert c in h.sched.running and c in batch.seqs[: batch.num_decode]
    assert c.num_computed == computed + 1
    h.step()
    assert c.num_computed == computed + 2
    assert h.sched.preemptions == 1 and h.cache.audit().ok


def admitted_beside(blocks: int, swapped: bool) -> bool:
    """Whether d, waiting behind c, is admitted in the step c decodes again after being
    swapped out (``swapped``), or in the same step had c never left."""
    h = Harness(blocks=blocks, decode_headroom=6, swap_space="1MiB", max_num_batched_tokens=8)
    h.add("a", 4)
    c = h.add("c", 4)
    h.step()
    h.step()
    if swapped:
        h.sched._preempt(c)
        assert c.swapped is not None
    d = h.add("d", 4)
    batch = h.step()
    assert c in batch.seqs[: batch.num_decode]
    return d in batch.seqs


def test_a_request_behind_a_returning_sequence_is_admitted_as_if_it_had_never_left():
    """Swapped back in, a sequence's next claim counts once against admissions, like any
    running sequence's: d is admitted at exactly the pool sizes it would be had c stayed."""
    sizes = range(28, 60)  # from the smallest pool where c can come back beside a
    stayed = [admitted_beside(n, swapped=False) for n in sizes]
    assert any(stayed) and not all(stayed)  # the sizes cross the admission threshold
    assert [admitted_beside(n, swapped=True) for n in sizes] == stayed


def test_a_preempted_sequence_the_swap_space_cannot_hold_is_recomputed():
    h, *_, c = preempting_c(swap_space=64)  # fewer bytes than c's blocks take
    h.step()
    assert h.sched.preemptions == 1 and h.sched.swaps == 0
    assert c.swapped is None and c.num_computed == 0


def test_aborting_a_swapped_out_request_releases_its_host_copy():
    h, *_, c = preempting_c(swap_space="1MiB")
    h.step()
    assert h.sched.swapped_bytes > 0
    h.sched.finish(c)
    assert h.sched.swapped_bytes == 0 and c.swapped is None and c not in h.sched.waiting


def test_sequences_that_do_not_evict_are_never_compressed():
    h = Harness(blocks=20, decode_headroom=0)  # admit them all: the pool must run short
    plain = h.add("plain", 6, compression_interval=1)
    full = h.add("full", 6, policy="full", compression_rate=4.0, compression_interval=1)
    rate_one = h.add("one", 6, compression_rate=1.0, compression_interval=1)
    for _ in range(12):  # the pool runs short and sequences are preempted and recomputed
        h.step()
    assert h.sched.preemptions > 0
    assert h.spy.calls == []
    assert h.sched.compression_passes == 0
    for seq in (plain, full, rate_one):
        assert seq.compressions == 0
        if seq.slot is not None:
            assert kept(h.cache, seq) == int(h.cache.seq_lens[seq.slot]) * LAYERS * HEADS


def test_every_waiting_prompt_that_fits_is_admitted_in_one_prefill():
    h = Harness(blocks=200, decode_headroom=0)
    seqs = [h.add(f"s{i}", 8) for i in range(8)]  # all eight sequence rows of the cache
    batch = h.step()
    assert is_prefill(batch) and [s.request_id for s in batch.seqs] == [s.request_id for s in seqs]


def test_the_headroom_of_a_request_admitted_alone_is_kept_from_the_next():
    # a: 4 blocks of prompt and 8 of headroom (8 tokens to generate, two rows): 12 of 20.
    # b needs as much again, which only 8 free blocks cannot give: it waits.
    h = Harness(blocks=20, decode_headroom=8)
    a = h.add("a", 4, max_tokens=8)
    h.add("b", 4, max_tokens=8)
    assert h.step().seqs == [a]
    assert len(h.sched.waiting) == 1


def prefill_long(h: Harness, **compression) -> tuple[Sequence, list[int]]:
    """A 60-token prompt (60 blocks uncompressed) whose budget keeps 4 KVs per head, prefilled
    in the harness's chunks; its chunk sizes, the pool's peak checked at every step."""
    long = h.add("long", 60, max_cache_tokens=4, protected_window=2, **compression)
    chunks = []
    while not long.prefilled:
        chunks.append(h.step().num_tokens[0])
        assert h.cache.pool.peak_used <= h.cache.num_blocks
    assert kept(h.cache, long) <= 4 * LAYERS * HEADS
    assert h.sched.preemptions == 0
    return long, chunks


def test_a_prompt_longer_than_the_pool_is_compressed_after_every_chunk_if_asked():
    h = Harness(blocks=24, prefill_chunk_size=8, prefill_compression="every-chunk")
    long, chunks = prefill_long(h)
    assert chunks == [8] * 7 + [4]
    assert h.calls("after") == [(n, [long.slot]) for n in range(1, 9)]  # the last one too
    assert h.calls("schedule") == []


def test_a_prompt_longer_than_the_pool_is_compressed_when_its_next_chunk_needs_the_blocks():
    h = Harness(blocks=24, prefill_chunk_size=8)
    long, chunks = prefill_long(h)
    assert chunks == [8] * 7 + [4]  # whole chunks: compressed before they were cut
    # 8 blocks a chunk: three fill the pool, the fourth finds it full; compressed, the prompt
    # holds 4 blocks, and two more chunks fit before the next compression.
    assert h.calls("schedule") == [(4, [long.slot]), (6, [long.slot])]
    assert h.calls("after") == [(8, [long.slot])]  # and once its prefill ended


def test_a_prompt_that_fits_is_compressed_once_after_its_last_chunk():
    h = Harness(blocks=128, prefill_chunk_size=8)
    long, chunks = prefill_long(h)
    assert chunks == [8] * 7 + [4]
    assert h.spy.calls and h.calls("schedule") == []
    assert h.calls("after") == [(8, [long.slot])]
    assert long.compressions == 1 and not long.compression_deferred


def test_deferred_chunks_are_compressed_to_admit_a_waiting_request():
    h = Harness(blocks=40, prefill_chunk_size=8, decode_headroom=0)
    long = h.add("long", 60, max_cache_tokens=4, protected_window=2)
    for _ in range(4):  # 32 tokens: 32 blocks held, 8 free
        h.step()
    assert long.compression_deferred and h.cache.num_free_blocks == 8
    late = h.add("late", 8, max_tokens=4)  # its 8 blocks and long's next chunk's 8 do not fit
    batch = h.step()
    assert h.calls("schedule") == [(5, [long.slot])]
    assert batch.seqs == [long, late] and batch.num_tokens == [8, 8]
    assert h.sched.preemptions == 0


@pytest.mark.parametrize(
    ("prompt", "compression", "chunks"),
    [
        (80, {"max_cache_tokens": 8}, [48, 32]),  # 16 left would be shorter than the window
        (100, {"max_cache_tokens": 8}, [64, 36]),
        (80, {"max_cache_tokens": 8, "window_size": 8}, [64, 16]),
        (80, {}, [64, 16]),  # nothing evicted: no window to fill
        (20, {"max_cache_tokens": 8}, [20]),
    ],
)
def test_the_last_chunk_of_an_evicting_prompt_holds_its_observation_window(
    prompt, compression, chunks
):
    h = Harness(blocks=256, prefill_chunk_size=64)
    seq = h.add("s", prompt, protected_window=2, **compression)
    sizes = []
    while not seq.prefilled:
        sizes.append(h.step().num_tokens[0])
    assert sizes == chunks


def record_compressions(h: Harness, monkeypatch) -> list[tuple[list[int], object]]:
    """(slots, ScorerInputs) of every compression call the scheduler makes."""
    given = []
    real = h.spy.compress

    def recording(seq_slots, params, inputs=None):
        given.append((list(seq_slots), inputs))
        return real(seq_slots, params, inputs)

    monkeypatch.setattr(h.spy, "compress", recording)
    return given


def window_queries(shape: tuple[int, int, int, int]) -> WindowQueries:
    return WindowQueries(*shape, torch.device("cpu"), RotaryEmbedding(shape[-1], 10_000.0, None))


def test_last_query_sequences_get_their_kept_queries_and_forks_start_from_the_parents(
    monkeypatch,
):
    h = Harness(blocks=64)
    shape = (8, LAYERS, 2 * HEADS, 2)
    store = LastQueries(*shape, torch.device("cpu"))
    store.capture([0], [0])  # allocates the rows; fill each with something of its own
    store.store[:] = torch.randn(store.shape, generator=torch.Generator().manual_seed(0))
    h.sched.kept_queries = KeptQueries(store, window_queries(shape))
    given = record_compressions(h, monkeypatch)
    params = CompressionParams(scorer="last-query", compression_rate=2, min_cache_tokens=0)
    seq = Sequence("p", list(range(12)), SamplingParams(n=2, temperature=1.0), params)
    h.sched.add(seq)
    h.add("w", 10, compression_rate=2)  # a window-scored neighbour: no query of its own read
    h.step()
    ((slots, inputs),) = given
    assert slots == [seq.slot, h.sched.running[1].slot]
    assert torch.equal(inputs.last_queries, store.store[slots])
    child = seq.child(1)
    h.sched.fork(seq, [child])
    assert torch.equal(store.get([child.slot]), store.get([seq.slot]))


def test_expected_attention_sequences_get_their_expected_query_and_forks_copy_it(monkeypatch):
    h = Harness(blocks=64)
    shape = (8, LAYERS, 2 * HEADS, 2)
    windows = window_queries(shape)
    windows.allocated()[:] = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    h.sched.kept_queries = KeptQueries(LastQueries(*shape, torch.device("cpu")), windows)
    given = record_compressions(h, monkeypatch)
    params = CompressionParams(scorer="expected-attention", compression_rate=2, min_cache_tokens=0)
    seq = Sequence("p", list(range(12)), SamplingParams(n=2, temperature=1.0), params)
    h.sched.add(seq)
    h.step()
    ((slots, inputs),) = given
    assert torch.equal(inputs.query_mean, windows.store[slots])
    assert inputs.last_queries is None and inputs.query_var is None
    child = seq.child(1)
    h.sched.fork(seq, [child])
    assert torch.equal(windows.get([child.slot]), windows.get([seq.slot]))
