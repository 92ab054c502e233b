"""Admission, chunked prefill, compression triggers and preemption under a fixed KV budget.

Each step mixes the running sequences' decodes with prefill chunks (at most
``prefill_chunk_size`` tokens of one sequence), within ``max_num_batched_tokens`` tokens.
A sequence that evicts is compressed once its prefill ends, and between its chunks when
the step's chunks, decodes or next admission need the blocks its uncompressed chunks hold
(``prefill_compression="when-needed"``), or after every chunk ("every-chunk"). Either way a
prompt of any length runs in the memory its budget and one chunk take; deferring keeps the
quality of one-shot compression while the pool has room (the last window, which has seen
the question at the end, ranks the whole prompt). The last chunk of an evicting prompt is at
least its observation window, for the same reason. A request is admitted when its first
chunk fits beside what the running sequences may still claim (the decode headroom), so
admitting it does not force a preemption a few steps later.

Order of remedies when memory runs short: compress (sequences whose parameters allow it,
down to their budgets), then preempt the most recently admitted sequence. A preempted
sequence is swapped out to host memory while ``swap_space`` has room (it comes back with
exactly the KVs it held, as soon as they fit again), else recomputed later through the same
chunked, compressing prefill. A request is never dropped.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import NamedTuple

import torch

from kvcompress.cache import PagedKVCache, swap_bytes, swap_in, swap_out
from kvcompress.compress import Compressor, ScorerInputs
from kvcompress.compress.budget import blocks_after_compression
from kvcompress.engine.config import EngineConfig
from kvcompress.engine.kept_queries import KeptQueries
from kvcompress.engine.sequence import Sequence, SequenceStatus
from kvcompress.engine.token_spans import TokenSpans

logger = logging.getLogger(__name__)


class ScheduledBatch(NamedTuple):
    seqs: list[Sequence]  # decoding sequences first, then prefill chunks
    num_tokens: list[int]  # tokens each sequence feeds this step
    num_decode: int  # the first ``num_decode`` sequences decode one token
    # Indices of the sequences whose step reaches their last token: they sample.
    sample: list[int]
    # Sequences that can no longer grow even alone in the cache: the engine ends them with
    # finish reason "length" rather than loop on preempting them (admission refuses any
    # request that could get here; this is the last guard).
    exhausted: list[Sequence]

    @property
    def prefill_tokens(self) -> int:
        return sum(self.num_tokens[self.num_decode :])


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        cache: PagedKVCache,
        compressor: Compressor,
        kept_queries: KeptQueries | None = None,
        token_spans: TokenSpans | None = None,
    ) -> None:
        self.config = config
        self.cache = cache
        self.compressor = compressor
        # What the backend kept of the queries, for scorers that read it (last-query,
        # expected-attention).
        self.kept_queries = kept_queries
        # The tokenizer's spans, for those scorers in requests that pool over spans.
        self.token_spans = token_spans
        self.chunk_size = config.chunk_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.compression_passes = 0
        self.compression_seconds = 0.0
        self.preemptions = 0
        self.swaps = 0  # preemptions that swapped out
        self.swapped_bytes = 0  # host bytes the swapped-out sequences hold now
        # Swapping reads and writes this process's pool: not under tensor parallelism, whose
        # scheduler drives every rank's.
        self.swap_space = config.swap_space if isinstance(cache, PagedKVCache) else 0

    @property
    def heads(self) -> int:
        return self.cache.num_layers * self.cache.num_kv_heads

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ schedule
    def schedule(self) -> ScheduledBatch | None:
        exhausted: list[Sequence] = []
        self._compress_deferred_if_short()
        # Each round schedules something, frees blocks by compressing, or preempts.
        for _ in range(2 * len(self.running) + 2):
            decode_need = self._make_room_for_decode(exhausted)
            batch = self._plan(decode_need, exhausted)
            if batch.seqs or not self.running:
                break
            # Every running sequence is prefilling and none has room for a token: compress
            # what may be, else preempt the latest (a lone one can always go on: admission
            # refused any request whose budget cannot fit the pool).
            if not self.compress([s for s in self.running if s.may_compress]):
                self._preempt_or_exhaust(exhausted)
        if not batch.seqs and not exhausted:
            if self.waiting and not self.running:
                # add_request refuses what cannot run alone; reaching here is a bug, and
                # raising beats spinning forever.
                raise RuntimeError(
                    f"cannot admit request {self.waiting[0].request_id} into an empty cache "
                    f"of {self.cache.num_free_blocks} free blocks"
                )
            return None
        return batch

    def _plan(self, decode_need: int, exhausted: list[Sequence]) -> ScheduledBatch:
        """This step's decodes (needing ``decode_need`` new blocks), chunks and admissions."""
        free = self.cache.num_free_blocks - decode_need
        # Swapped-out sequences at the queue's front first: back in, they decode (within
        # the reserve taken for them) or take their next chunk below, in this very step.
        free -= self._swap_in_front(free)
        decodes = [s for s in self.running if s.prefilled]
        tokens_left = self.config.max_num_batched_tokens - len(decodes)
        scheduled: dict[int, int] = {}  # id(sequence) -> its chunk this step
        chunks: list[Sequence] = []
        for seq in self.running:
            if seq.prefilled or tokens_left <= 0:
                continue
            want = self._chunk(seq, min(self.chunk_size, seq.num_uncomputed, tokens_left))
            n, need = self.fit_chunk(seq, want, free)
            if n:
                chunks.append(seq)
                scheduled[id(seq)] = n
                tokens_left -= n
                free -= need
        if self.waiting and tokens_left > 0:
            free -= sum(self._headroom(s, scheduled.get(id(s), 0)) for s in self.running)
        # Sequence slots promised to the forks of prefilling n > 1 requests.
        forks = sum(s.forks_pending for s in self.running)
        while self.waiting and tokens_left > 0:
            seq = self.waiting[0]
            if seq.swapped is not None:  # waits until it fits (_swap_in_front)
                break
            n = self._chunk(seq, min(self.chunk_size, seq.num_uncomputed, tokens_left))
            whole = bool(seq.branches)
            if whole:
                # A branched prompt is prefilled whole, in one chunk, whatever the chunk
                # size: each branch is then compressed from the whole prompt's window, as
                # a one-shot prefill would be. Longer than the step's token budget, it
                # takes a step of its own.
                n = seq.num_uncomputed
                if n > tokens_left and (decodes or chunks):
                    break
            # A first chunk as large as the room left allows: a budget smaller than one
            # chunk still starts (the rest of the prompt follows in smaller chunks).
            bs = self.cache.block_size
            if self.running:
                # Beside others, the request must also leave room for what it may claim
                # next (a smaller chunk leaves more of its prompt to claim).
                if not whole:
                    n = min(n, (free - self._headroom(seq, n)) // self.heads * bs)
                fits = n >= 1 and self.cache.blocks_for(n) + self._headroom(seq, n) <= free
            else:
                # Alone, its first chunk fitting is enough: the add-time check made sure it
                # can finish.
                if not whole:
                    n = min(n, free // self.heads * bs)
                fits = n >= 1 and self.cache.blocks_for(n) <= free
            rows = 1 + seq.forks_pending  # sequence rows it will take
            if (
                not fits
                or len(self.running) + forks + rows > self.config.max_num_seqs
                or self.cache.num_free_seq_slots - forks < rows
            ):
                break
            need = self.cache.blocks_for(n)
            # Kept from the requests admitted after it, even when it came alone.
            reserve = self._headroom(seq, n)
            forks += seq.forks_pending
            self.waiting.popleft()
            seq.slot = self.cache.allocate_seq()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunks.append(seq)
            scheduled[id(seq)] = n
            tokens_left -= n
            free -= need + reserve
        seqs = decodes + chunks
        num_tokens = [1] * len(decodes) + [scheduled[id(s)] for s in chunks]
        sample = [i for i, s in enumerate(seqs) if num_tokens[i] == s.num_uncomputed]
        return ScheduledBatch(seqs, num_tokens, len(decodes), sample, exhausted)

    def chunk_alone(self, seq: Sequence) -> int:
        """The next chunk of a sequence prefilled outside the queues (teacher forcing,
        inspection), sized as a step would size it with the pool to itself: its deferred
        chunks are compressed first if the chunk does not fit beside them."""
        want = self._chunk(seq, min(self.chunk_size, seq.num_uncomputed))
        slot = torch.tensor([seq.slot], dtype=torch.long)
        need = self.cache.blocks_needed(slot, torch.tensor([want]))
        if seq.compression_deferred and need > self.cache.num_free_blocks:
            self.compress([seq])
        return self.fit_chunk(seq, want, self.cache.num_free_blocks)[0]

    def _chunk(self, seq: Sequence, n: int) -> int:
        """``n`` tokens of ``seq``'s prompt, fewer if they would leave a last chunk shorter
        than the observation window of an evicting prompt: the compression after the prefill
        ranks every KV by the last chunk's window, which a one-shot prefill fills with the
        prompt's last ``window_size`` tokens (unless the window is longer than a chunk)."""
        left = seq.num_uncomputed - n
        if left <= 0 or not seq.compression.evicts:
            return n
        window = seq.compression.metric_settings(self.config.metric).window_size
        before_window = seq.num_uncomputed - window
        if left >= window or window > self.chunk_size or before_window < 1:
            return n
        return before_window

    def _compress_deferred_if_short(self) -> None:
        """Compress the sequences whose chunks' compression was deferred, if the blocks this
        step may take (the decodes' next blocks, whole chunks for the prefilling sequences
        within the step's token budget, the next admission's first chunk and the running
        sequences' claims beside it) are more than the pool has free."""
        deferred = [s for s in self.running if s.compression_deferred]
        if not deferred:
            return
        decodes = [s for s in self.running if s.prefilled]
        want = self._decode_need(decodes)
        tokens_left = self.config.max_num_batched_tokens - len(decodes)
        slots, chunks = [], []
        for seq in self.running:
            if not seq.prefilled and tokens_left > 0:
                slots.append(seq.slot)
                chunks.append(min(self.chunk_size, seq.num_uncomputed, tokens_left))
                tokens_left -= chunks[-1]
        if chunks:
            want += self.cache.blocks_needed(torch.tensor(slots), torch.tensor(chunks))
        forks = sum(s.forks_pending for s in self.running)
        if (
            self.waiting
            and tokens_left > 0
            and len(self.running) + forks < self.config.max_num_seqs
        ):
            seq = self.waiting[0]
            first = min(self.chunk_size, seq.num_uncomputed)
            held = seq.swapped.num_blocks if seq.swapped else self.cache.blocks_for(first)
            want += held + sum(self._headroom(s, 0) for s in [*self.running, seq])
        if want > self.cache.num_free_blocks:
            self.compress(deferred)

    def _swap_in_front(self, free: int) -> int:
        """Swap back in the sequences at the front of the queue that were swapped out, while
        what each held and its token this step fit ``free`` beside what the running ones
        may still claim, and its own next claim; returns the blocks they took this step.

        Their next claims are not taken here: from now on they are running sequences, whose
        headroom ``_plan`` sets against admissions, theirs once with the others'."""
        taken = 0
        claims = sum(self._headroom(s, 0) for s in self.running)
        # Slots promised to forks; a swapped-out sequence has none pending (_may_swap).
        forks = sum(s.forks_pending for s in self.running)
        while self.waiting and self.waiting[0].swapped is not None:
            seq = self.waiting[0]
            assert seq.swapped is not None
            reserve = self._headroom(seq, 0)
            # A prefilled sequence decodes in this very step; one preempted mid-prompt takes
            # its next chunk through fit_chunk instead.
            step = seq.swapped.blocks_for_one_token(self.cache.block_size) if seq.prefilled else 0
            need = seq.swapped.num_blocks + step
            if (
                need + (reserve if self.running else 0) + claims > free - taken
                or len(self.running) + forks + 1 > self.config.max_num_seqs
                or self.cache.num_free_seq_slots - forks < 1
            ):
                break
            self.waiting.popleft()
            self._swap_in(seq)
            taken += need
            claims += reserve
        return taken

    def fit_chunk(self, seq: Sequence, n: int, free: int) -> tuple[int, int]:
        """The largest chunk of at most ``n`` tokens whose blocks fit ``free``, with them."""
        slot = torch.tensor([seq.slot], dtype=torch.long)
        while n > 0:
            need = self.cache.blocks_needed(slot, torch.tensor([n]))
            if need <= free:
                return n, need
            # Room for fewer tokens: every head may need a block for its partial one.
            fewer = (free // self.heads - 1) * self.cache.block_size
            n = min(max(fewer, 1), n // 2) if n > 1 else 0
        return 0, 0

    def _headroom(self, seq: Sequence, scheduled: int) -> int:
        """Blocks a sequence may still claim beyond this step, reserved at admission.

        A sequence that evicts is compressed when memory runs short, so it reserves one
        block per head. One that does not reserves its uncomputed prompt and the next
        ``decode_headroom`` tokens it may generate. A sequence still to fork (n > 1)
        reserves the growth of each of its forks too (they share its prompt).
        """
        forks = seq.forks_pending
        generate = min(
            seq.sampling.max_tokens - len(seq.output_token_ids), self.config.decode_headroom
        )
        fork_growth = self.cache.blocks_for(generate + self.cache.block_size)
        if seq.branches:
            # Prefilled whole in the step that admits it; then each evicting branch copies
            # the shared blocks it compacts into (at most what it keeps) and reserves a
            # block per head, and each other branch grows as a fork does.
            prompt, bs = seq.num_tokens, self.cache.block_size
            return sum(
                blocks_after_compression(b.compression, prompt, self.heads, bs) + self.heads
                if b.compression.evicts
                else fork_growth
                for b in seq.branches
            )
        if seq.compression.evicts:
            return self.heads * (1 + forks)
        left = seq.num_uncomputed - scheduled
        grow = self.cache.blocks_for(left + generate) if left + generate > 0 else 0
        return grow + forks * fork_growth

    def _decode_need(self, decodes: list[Sequence]) -> int:
        if not decodes:
            return 0
        slots = torch.tensor([s.slot for s in decodes], dtype=torch.long)
        return self.cache.blocks_needed(slots, torch.ones(len(decodes), dtype=torch.long))

    def _make_room_for_decode(self, exhausted: list[Sequence]) -> int:
        """Compress, then preempt, until the decodes' next blocks fit; returns their need."""
        compressed = False
        while True:
            need = self._decode_need([s for s in self.running if s.prefilled])
            if need <= self.cache.num_free_blocks:
                return need
            if compressed:
                self._preempt_or_exhaust(exhausted)
            else:
                self.compress([s for s in self.running if s.may_compress])
                compressed = True

    def _preempt_or_exhaust(self, exhausted: list[Sequence]) -> None:
        if len(self.running) == 1:
            seq = self.running.pop()
            logger.warning("request %s cannot grow even alone in the cache", seq.request_id)
            exhausted.append(seq)
        else:
            self._preempt(self.running[-1])

    def _preempt(self, seq: Sequence) -> None:
        """Free a sequence's blocks: swapped out when ``swap_space`` has room for them, else
        recomputed from its tokens when admitted again."""
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)
        if self._may_swap(seq):
            # The queries it kept for its scorer go with it (none for the others).
            if self.kept_queries is not None and (seq.keeps_last_query or seq.keeps_window_queries):
                seq.swapped_queries = self.kept_queries.rows(seq.slot)
            seq.swapped = swap_out(self.cache, seq.slot)
            seq.slot = None
            self.swapped_bytes += seq.swapped.nbytes
            self.swaps += 1
            return
        self.cache.free_seq(seq.slot)
        seq.slot = None
        seq.num_computed = 0
        seq.prefilled = False
        seq.compressions = 0
        seq.steps_since_compression = 0
        seq.compression_deferred = False

    def _may_swap(self, seq: Sequence) -> bool:
        """Whether ``seq`` is swapped out rather than recomputed: it holds something, the
        swap space has room for it, and it has no forks or branches still to make (they
        would share blocks it no longer holds)."""
        if seq.num_computed == 0 or seq.forks_pending or seq.branches:
            return False
        held = swap_bytes(self.cache, self.cache.blocks_held(seq.slot))
        return self.swapped_bytes + held <= self.swap_space

    def _swap_in(self, seq: Sequence) -> None:
        swapped = seq.swapped
        assert swapped is not None
        seq.slot = swap_in(self.cache, swapped)
        if self.kept_queries is not None and seq.swapped_queries is not None:
            self.kept_queries.put(seq.slot, seq.swapped_queries)
        self._drop_swapped(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def _drop_swapped(self, seq: Sequence) -> None:
        if seq.swapped is not None:
            self.swapped_bytes -= seq.swapped.nbytes
        seq.swapped = None
        seq.swapped_queries = None

    # ------------------------------------------------------------------ compression
    def compress(self, seqs: list[Sequence]) -> bool:
        """Compress the sequences that may be; whether any blocks were freed."""
        seqs = [s for s in seqs if s.may_compress and s.slot is not None]
        if not seqs:
            return False
        stats = self.compressor.compress(
            [s.slot for s in seqs], [s.compression for s in seqs], self._scorer_inputs(seqs)
        )
        self.compression_passes += 1
        self.compression_seconds += stats.seconds
        for seq in seqs:
            seq.compression_deferred = False
            seq.compressions += 1
            seq.steps_since_compression = 0
        return stats.blocks_freed > 0

    def _scorer_inputs(self, seqs: list[Sequence]) -> ScorerInputs | None:
        """What the sequences' scorers need from the engine: the queries kept for them and
        their tokens' spans, when one of them reads any (rows of the others are never
        read)."""
        inputs = None
        if self.kept_queries is not None:
            needs = {f for s in seqs for f in s.compression.scorer_requires}
            inputs = self.kept_queries.inputs([s.slot for s in seqs], needs)
        readers = [
            i
            for i, s in enumerate(seqs)
            if s.compression.pools_spans_at_compression(self.config.metric)
        ]
        if readers and self.token_spans is not None:
            spans = torch.zeros(
                len(seqs), max(seqs[i].num_tokens for i in readers), dtype=torch.long
            )
            for i in readers:
                starts = self.token_spans.span_starts(seqs[i].token_ids)
                spans[i, : starts.numel()] = starts
            inputs = (inputs or ScorerInputs())._replace(spans=spans.to(self.cache.config.device))
        return inputs

    def after_step(self, batch: ScheduledBatch) -> None:
        """Compression triggers: after a prompt's last chunk (after every chunk with
        ``prefill_compression="every-chunk"``; an earlier chunk's is otherwise deferred until
        the pool needs its blocks), and every ``compression_interval`` decode steps."""
        every_chunk = self.config.prefill_compression == "every-chunk"
        last_chunks = set(batch.sample)
        due = []
        for i, seq in enumerate(batch.seqs):
            if seq.finished:
                continue
            if i >= batch.num_decode:
                if every_chunk or i in last_chunks:
                    due.append(seq)
                else:
                    seq.compression_deferred = seq.may_compress
                continue
            seq.steps_since_compression += 1
            interval = seq.compression.compression_interval
            if interval is not None and seq.steps_since_compression >= interval:
                due.append(seq)
        self.compress(due)
        # Only now: the compression right after a prefill is the one ``compress_once`` allows.
        for i in batch.sample:
            batch.seqs[i].prefilled = True

    def fork(self, parent: Sequence, children: list[Sequence]) -> None:
        """Start the forks of a sequence whose prefill completed this step: each shares its
        blocks and continues as a sequence of its own (preempted alone, recomputed from
        the prompt and its own output)."""
        for child in children:
            child.slot = self.cache.fork_seq(parent.slot)
            child.num_computed = parent.num_computed
            child.prefilled = True
            child.compressions = parent.compressions
            child.steps_since_compression = parent.steps_since_compression
            if self.kept_queries is not None and (
                child.keeps_last_query or child.keeps_window_queries
            ):
                self.kept_queries.copy(parent.slot, child.slot)
            if not child.finished:  # one that stopped at its first token only reports
                child.status = SequenceStatus.RUNNING
                self.running.append(child)
        parent.forks_pending = 0

    def branch(self, parent: Sequence, children: list[Sequence]) -> None:
        """Start the branches of a branched prompt whose prefill completed this step: each
        shares its uncompressed blocks, the prefill leaves, and each branch is compressed
        by its own parameters, as an ordinary request is right after its prefill (one that
        stopped at its first token is not, as such a request is not). From then on they
        are ordinary sequences."""
        self.fork(parent, children)
        self.finish(parent)
        self.compress([c for c in children if not c.finished])

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.slot is not None:
            self.cache.free_seq(seq.slot)
            seq.slot = None
        self._drop_swapped(seq)  # an aborted swapped-out request's host copy
        seq.status = SequenceStatus.FINISHED
