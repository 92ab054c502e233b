"""One request's state inside the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from kvcompress.cache import SwappedSeq
from kvcompress.compress import CompressionParams
from kvcompress.engine.detokenizer import DetokenizerState
from kvcompress.engine.kept_queries import KeptRows
from kvcompress.engine.logprobs import TokenLogprob
from kvcompress.engine.outputs import KVStats
from kvcompress.engine.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Branch(NamedTuple):
    """One request of a branched prompt (``LLMEngine.add_branched_request``)."""

    request_id: str
    compression: CompressionParams


def prefill_params(branches: list[Branch]) -> CompressionParams:
    """The parameters a branched prompt's prefill runs with: those of a branch that reads
    the metric (all such branches need the same prefill, see
    ``shared_prefill_signature``), else the first branch's (the prefill collects nothing)."""
    return next(
        (b.compression for b in branches if b.compression.prefill_signature() is not None),
        branches[0].compression,
    )


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    compression: CompressionParams
    arrival: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    slot: int | None = None
    finish_reason: str | None = None
    output_text: str = ""
    detokenizer: DetokenizerState = field(default_factory=DetokenizerState)
    # Tokens whose KVs this step's predecessors computed (the cache's seq_lens of the
    # sequence): a prompt is prefilled in chunks, and a preempted sequence starts again at 0.
    num_computed: int = 0
    # The prompt (or, after a preemption, prompt and output) has been prefilled: from then on
    # the sequence feeds one token per step.
    prefilled: bool = False
    steps_since_compression: int = 0
    compressions: int = 0
    # It holds prompt chunks whose compression was put off until its prefill ends or the
    # pool needs their blocks (``prefill_compression="when-needed"``).
    compression_deferred: bool = False
    preemptions: int = 0
    kv_stats: KVStats | None = None
    generator: torch.Generator | None = None
    # Tokens appended to the prompt one decode step at a time after the prompt was prefilled
    # and compressed: lets a question arrive after its context was compressed.
    pending_suffix: list[int] = field(default_factory=list)
    # Prompt logprobs gathered chunk by chunk until the prefill completes, then handed to
    # that step's output; a preemption before then gathers them again from the start.
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    prompt_logprobs_sent: bool = False
    # Which of the request's sequences this is (0: the one that prefills the prompt; with
    # n > 1 or best_of, it forks the others once its prefill completes).
    index: int = 0
    # Sequences still to fork from this one: ``best_of - 1`` until its first sample.
    forks_pending: int = 0
    # Sum of the logprobs of the sampled tokens (kept only for best_of > n, to rank them).
    cumulative_logprob: float = 0.0
    # A branched prompt's prefill: the requests it forks into once its prefill is done,
    # before any compression (each then compressed by its own parameters). It samples
    # nothing itself, is never compressed and leaves the engine at the fork. Empty for
    # every other sequence.
    branches: list[Branch] = field(default_factory=list)
    # Preempted by swapping out (see cache/swap.py): the KVs it held, on the host, and the
    # queries the engine kept for its scorer; None while in the pool, or when preempted to
    # be recomputed.
    swapped: SwappedSeq | None = None
    swapped_queries: KeptRows | None = None

    def __post_init__(self) -> None:
        if self.sampling.seed is not None:
            # Seeded requests: sequence i draws from seed + i (wrapped to 64 bits).
            seed = (self.sampling.seed + self.index) % 2**64
            self.generator = torch.Generator().manual_seed(seed)
        if self.index == 0:
            self.forks_pending = len(self.branches) or self.sampling.num_seqs - 1

    def child(self, index: int) -> Sequence:
        """Sequence ``index`` of this request, forked from this one at its first sample:
        same prompt, no output yet and no cache slot (``PagedKVCache.fork_seq`` gives it
        one sharing this sequence's blocks)."""
        return Sequence(
            self.request_id,
            list(self.prompt_token_ids),
            self.sampling,
            self.compression,
            arrival=self.arrival,
            output_token_ids=list(self.output_token_ids),
            prompt_logprobs_sent=True,  # the prompt's logprobs go out once, with sequence 0
            index=index,
        )

    def branch_child(self, branch: Branch) -> Sequence:
        """The sequence of one branch, forked from this branched prefill: an ordinary
        request of the same prompt (and suffix still to feed) with the branch's id and
        compression, and no cache slot yet (``Scheduler.branch`` gives it one)."""
        return Sequence(
            branch.request_id,
            list(self.prompt_token_ids),
            self.sampling,
            branch.compression,
            arrival=self.arrival,
            pending_suffix=list(self.pending_suffix),
        )

    def drop_branch(self, request_id: str) -> None:
        """Forget an aborted branch of a prefill that has not run yet."""
        self.branches = [b for b in self.branches if b.request_id != request_id]
        self.forks_pending = len(self.branches)
        if self.branches:
            self.compression = prefill_params(self.branches)

    @property
    def token_ids(self) -> list[int]:
        """The whole sequence, a new list: for prefill and recompute, not for every step."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        """``token_ids[start:end]`` without building the whole sequence."""
        prompt = self.prompt_token_ids
        if end <= len(prompt):
            return prompt[start:end]
        n = len(prompt)
        return prompt[start:end] + self.output_token_ids[max(0, start - n) : end - n]

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to feed before the next sample (1 while decoding)."""
        return self.num_tokens - self.num_computed

    @property
    def last_token(self) -> int:
        """``token_ids[-1]`` without building the whole sequence (decode feeds it each step).

        Derived rather than stored, so it stays right when a caller appends to the lists
        directly: suffix tokens go to the prompt only before any output exists.
        """
        out = self.output_token_ids
        return out[-1] if out else self.prompt_token_ids[-1]

    def append_token(self, token: int) -> None:
        """Append one generated token."""
        self.output_token_ids.append(token)

    def append_prompt_token(self, token: int) -> None:
        """Append one prompt token after prefill (a suffix fed one decode step at a time)."""
        if self.output_token_ids:
            raise ValueError("prompt tokens cannot follow generated tokens")
        self.prompt_token_ids.append(token)

    @property
    def scores_prompt(self) -> bool:
        """Whether this sequence's prefill chunks must be scored (prompt logprobs)."""
        return self.sampling.prompt_logprobs is not None and not self.prompt_logprobs_sent

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def may_compress(self) -> bool:
        """Whether a compression now is allowed by the request's parameters.

        A prompt is compressed between its chunks whatever ``compress_once`` says: once
        means once after the prefill, and the prefill itself must stay within the budget.
        """
        if self.branches:  # forks before any compression: its branches compress
            return False
        p = self.compression
        return p.evicts and not (p.compress_once and self.compressions > 0 and self.prefilled)

    @property
    def collects_metric(self) -> bool:
        """Whether this sequence's KVs must accumulate the eviction metric.

        Only when a later compression will score by it: not for policies that rank by
        position or at random, not for ones that never evict, and not after a
        ``compress_once`` sequence has compressed. The others leave the metric alone and
        let their batch take the fused decode path. A branched prefill collects what its
        branches will compress by.
        """
        if self.branches:
            return self.compression.prefill_signature() is not None
        return self.compression.uses_metric and self.may_compress

    @property
    def keeps_last_query(self) -> bool:
        """Whether the backend must keep the query of this sequence's newest token: its
        scorer reads it (``last-query``) and a later compression will score. A branched
        prefill keeps it for its branches that read it (their fork copies it)."""
        return self._keeps("last_queries")

    @property
    def keeps_window_queries(self) -> bool:
        """Whether the backend must keep the queries of this sequence's prefill window:
        its scorer reads it (``expected-attention``) and a later compression will score; a
        branched prefill keeps it for its branches that read it."""
        return self._keeps("query_mean")

    def _keeps(self, field: str) -> bool:
        if self.branches:
            return any(field in b.compression.scorer_requires for b in self.branches)
        return field in self.compression.scorer_requires and self.may_compress
