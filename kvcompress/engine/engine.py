"""The engine: requests in, one batched model step at a time, outputs out.

Its public API is what every floor above uses (the offline ``LLM``, the async engine and
server, the CLI, benchmarks and evaluation): ``add_request`` / ``add_branched_request`` /
``abort_request``, ``step`` or ``run`` (the one drive loop), ``teacher_force``,
``capacity``, ``stats``, ``requests_in_flight``, ``tokenize`` / ``apply_chat_template`` and
``to_transformers``.
Errors are the typed ones of :mod:`kvcompress.errors`.
"""

from __future__ import annotations

import itertools
import logging
import time
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from kvcompress.compress import CompressionParams
from kvcompress.engine.admission import check_budget_fits
from kvcompress.engine.analysis import EngineAnalysis
from kvcompress.engine.branching import EngineBranching
from kvcompress.engine.config import EngineConfig
from kvcompress.engine.distributed import start_ranks
from kvcompress.engine.logprobs import TokenLogprob, token_logprobs
from kvcompress.engine.outputs import (
    Capacity,
    EngineStats,
    KVStats,
    RankBlocks,
    RequestOutput,
    RequestState,
)
from kvcompress.engine.sampling import Sampler, SamplingParams
from kvcompress.engine.scheduler import Scheduler
from kvcompress.engine.sequence import Sequence, SequenceStatus
from kvcompress.engine.stopping import check_stop
from kvcompress.errors import (
    ContextLengthError,
    InvalidParameterError,
    QueueFullError,
    WorkerFailedError,
)

logger = logging.getLogger(__name__)


class LLMEngine(EngineAnalysis, EngineBranching):
    def __init__(self, config: EngineConfig | None = None, **kwargs: Any) -> None:
        self.config = config = config or EngineConfig(**kwargs)
        # This process's model, cache, backend, compressor and runner; under tensor
        # parallelism (tensor_parallel_size > 1) rank 0's, and its handle on the other ranks.
        rank, self.ranks = start_ranks(config)
        self.device = rank.runner.device
        self.model_config = mc = rank.loaded.config
        self.tokenizer = rank.loaded.tokenizer
        self.max_model_len = rank.max_model_len
        self.cache, self.compressor, self.runner = rank.cache, rank.compressor, rank.runner
        self.backend = rank.backend
        if self.ranks:
            # The scheduler drives every rank: its cache, compressor and runner broadcast.
            self.cache, self.compressor, self.runner = self.ranks.driver_parts(rank)
            # The ranks never outlive the engine (collected, or at interpreter exit).
            self._finalizer = weakref.finalize(self, self.ranks.close)
        self.scheduler = Scheduler(
            config, self.cache, self.compressor, self.runner.kept_queries, self.runner.token_spans
        )
        self.sampler = Sampler(config.seed)
        self.eos_token_ids = set(mc.eos_token_ids)
        # Each request's sequences: one, or with n > 1 / best_of the prefilling one and,
        # from its first sample, its forks.
        self._requests: dict[str, list[Sequence]] = {}
        self._ids = itertools.count()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0

    # ------------------------------------------------------------------ requests
    def tokenize(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidParameterError(
                "this model's tokenizer has no chat template", param="messages"
            )
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception as err:  # jinja errors: the messages do not fit the template
            raise InvalidParameterError(
                f"the chat template rejected the messages: {err}", param="messages"
            ) from err
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def resolve_compression(
        self, compression: CompressionParams | Mapping[str, Any] | None
    ) -> CompressionParams:
        """A request's parameters: the engine's defaults with the request's fields over them
        (see :meth:`CompressionParams.with_overrides`)."""
        return self.config.compression.with_overrides(compression)

    def add_request(
        self,
        prompt: str | list[int],
        sampling: SamplingParams | None = None,
        compression: CompressionParams | Mapping[str, Any] | None = None,
        request_id: str | None = None,
        suffix: str | list[int] | None = None,
    ) -> str:
        """Queue a request; returns its id.

        Raises a :class:`~kvcompress.errors.RequestError` for a request that can never run
        and :class:`~kvcompress.errors.QueueFullError` when the queue is full.
        ``suffix`` (optional) is fed after the prompt has been prefilled and compressed, one
        token per decode step, before generation starts: for example a question added to a
        context that was compressed without seeing it.
        """
        sampling = sampling or SamplingParams()
        params = self.resolve_compression(compression)
        token_ids, suffix_ids = self._prompt_ids(prompt, suffix, sampling)
        if sampling.num_seqs > self.config.max_num_seqs:
            param = "best_of" if sampling.ranks else "n"
            raise InvalidParameterError(
                f"{param}={sampling.num_seqs} exceeds the engine's max_num_seqs "
                f"({self.config.max_num_seqs})",
                param=param,
            )
        check_budget_fits(
            self.capacity(),
            params,
            len(token_ids) + len(suffix_ids),
            sampling.max_tokens,
            sampling.num_seqs,
        )
        self._check_queue()
        (request_id,) = self._new_ids([request_id])
        seq = Sequence(request_id, token_ids, sampling, params, pending_suffix=suffix_ids)
        self._requests[request_id] = [seq]
        self.scheduler.add(seq)
        return request_id

    def _prompt_ids(
        self,
        prompt: str | list[int],
        suffix: str | list[int] | None,
        sampling: SamplingParams,
    ) -> tuple[list[int], list[int]]:
        """A request's prompt and suffix as token ids, checked against the vocabulary and
        the model's context."""
        token_ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if not token_ids:
            raise InvalidParameterError("the prompt is empty", param="prompt")
        if isinstance(suffix, str):
            suffix_ids = list(self.tokenizer(suffix, add_special_tokens=False)["input_ids"])
        else:
            suffix_ids = list(suffix or [])
        if suffix_ids and sampling.prompt_logprobs is not None:
            # The suffix is fed after the prefill, where prompt logprobs are not gathered.
            raise InvalidParameterError(
                "prompt_logprobs cannot be combined with a suffix", param="prompt_logprobs"
            )
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in token_ids + suffix_ids):
            raise InvalidParameterError(
                f"prompt token ids must be integers in [0, {vocab})", param="prompt"
            )
        total = len(token_ids) + len(suffix_ids)
        if total >= self.max_model_len:
            raise ContextLengthError(
                f"the prompt has {total} tokens; the model's context is "
                f"{self.max_model_len} tokens, including at least one generated token",
                param="prompt",
            )
        return token_ids, suffix_ids

    def _check_queue(self) -> None:
        max_queue = self.config.max_queue
        if max_queue is not None and len(self.scheduler.waiting) >= max_queue:
            raise QueueFullError(f"the queue is full ({max_queue} requests waiting)")

    def _new_ids(self, request_ids: list[str | None]) -> list[str]:
        """The given ids (None: a fresh one), refused if in use or repeated."""
        ids = [i if i is not None else f"req-{next(self._ids)}" for i in request_ids]
        for k, request_id in enumerate(ids):
            if request_id in self._requests or request_id in ids[:k]:
                raise InvalidParameterError(
                    f"request id {request_id!r} is already in use", param="request_id"
                )
        return ids

    def abort_request(self, request_id: str) -> bool:
        """Stop a request and free its blocks; False if it was unknown or already done."""
        seqs = self._requests.pop(request_id, None)
        if seqs and seqs[0].branches and not seqs[0].finished:
            # A branch of a prompt not prefilled yet: the prefill goes on for the others.
            parent = seqs[0]
            parent.drop_branch(request_id)
            if not parent.branches:
                self.scheduler.finish(parent)
            return True
        live = [s for s in seqs or [] if not s.finished]
        for seq in live:
            seq.finish_reason = "abort"
            self.scheduler.finish(seq)
        return bool(live)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    def requests_in_flight(self) -> list[RequestState]:
        """Every request not yet finished: running ones first, then the queue in order."""
        running = [(s, "running") for s in self.scheduler.running]
        waiting = [(s, "waiting") for s in self.scheduler.waiting]
        return [
            RequestState(rid, status, len(s.prompt_token_ids), len(s.output_token_ids))
            for s, status in running + waiting
            # A branched prompt still to prefill stands for each of its requests.
            for rid in [b.request_id for b in s.branches] or [s.request_id]
        ]

    def run(self) -> Iterator[RequestOutput]:
        """Step until no request is left, yielding every output as it comes.

        This is the one drive loop. Requests may be added (or aborted) while iterating:
        they join the next step.
        """
        while self.has_unfinished_requests():
            yield from self.step()

    # ------------------------------------------------------------------ step
    def step(self) -> list[RequestOutput]:
        """Run one batched step; returns outputs of the requests it advanced."""
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        outputs: list[RequestOutput] = []
        for seq in batch.exhausted:
            self._finish(seq, "length")
            outputs.append(self._output(seq, []))
        if not batch.seqs:
            return self._mark_finished(outputs)
        start = time.perf_counter()
        sampled = [batch.seqs[i] for i in batch.sample]
        # Chunks whose positions must be scored (prompt logprobs): none in a decode-only step.
        score = {
            i: seq.sampling.prompt_logprobs
            for i, seq in enumerate(batch.seqs[batch.num_decode :], batch.num_decode)
            if seq.scores_prompt
        }
        try:
            out = self.runner.run(
                batch.seqs, batch.num_tokens, batch.num_decode, batch.sample, score
            )
            logits, sampled, forks = self._fork_at_first_sample(out.logits, sampled)
            tokens, logprobs = self._sample(logits, sampled)
        except WorkerFailedError:  # the ranks are gone: no later step can run either
            raise
        except Exception:
            # The batch's requests end with reason "error" and their blocks return to the
            # pool; the engine and every other request carry on.
            logger.exception("engine step failed; ending its %d requests", len(batch.seqs))
            for seq in batch.seqs:
                self._finish(seq, "error")
                # Forks registered this step (n > 1) end with their parent.
                for sibling in self._requests.get(seq.request_id, []):
                    if not sibling.finished:
                        self._finish(sibling, "error")
                failed = self._output(seq, [])
                # A branched prompt's prefill ends each of its requests.
                ids = [b.request_id for b in seq.branches] or [seq.request_id]
                outputs.extend(failed._replace(request_id=rid) for rid in ids)
            return self._mark_finished(outputs)
        elapsed = time.perf_counter() - start
        prefill_tokens = batch.prefill_tokens
        self.prompt_tokens += prefill_tokens
        if prefill_tokens:
            self.prefill_seconds += elapsed
        else:
            self.decode_seconds += elapsed
        for i, entries in out.prompt_logprobs.items():
            seq = batch.seqs[i]
            if seq.num_computed == 0:  # the first chunk (again, after a preemption)
                seq.prompt_logprobs = [None]
            seq.prompt_logprobs.extend(entries)
        for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
            seq.num_computed += n
        new_tokens: dict[int, list[int]] = {}
        extras: dict[int, dict[str, Any]] = {}  # logprobs this step reports, by id(seq)
        for seq, token, logprob in zip(sampled, tokens, logprobs, strict=True):
            if seq.scores_prompt:  # the prefill is complete: its prompt logprobs go out now
                extras[id(seq)] = {
                    "prompt_logprobs": seq.prompt_logprobs,
                    "prompt_token_ids": list(seq.prompt_token_ids),
                }
                seq.prompt_logprobs, seq.prompt_logprobs_sent = [], True
            if token is None:  # scoring only (max_tokens=0): done once the prompt is in
                seq.status = SequenceStatus.FINISHED
                seq.finish_reason = "length"
                continue
            if seq.pending_suffix:  # still feeding the suffix: its next token, not a sample
                seq.append_prompt_token(seq.pending_suffix.pop(0))
                continue
            seq.append_token(token)
            new_tokens[id(seq)] = [token]
            if logprob is not None:
                seq.cumulative_logprob += logprob.logprob
                if seq.sampling.logprobs is not None:
                    extras.setdefault(id(seq), {})["logprobs"] = [logprob]
            self.generation_tokens += 1
            check_stop(seq, token, self.tokenizer, self.eos_token_ids, self.max_model_len)
        self.scheduler.after_step(batch)
        for parent, children in forks:
            if parent.branches:
                # Branches share the uncompressed prompt, then each compresses its own way.
                for child in children:
                    self._requests[child.request_id] = [child]
                self.scheduler.branch(parent, children)
            else:
                # Forks share the parent's blocks as compressed after its prefill.
                self.scheduler.fork(parent, children)
        for seq in batch.seqs + [c for _, children in forks for c in children]:
            if seq.branches:  # a branched prefill reports through its branches
                continue
            if seq.finished and seq.slot is not None:
                seq.kv_stats = self.kv_stats(seq)
                self.scheduler.finish(seq)
            new = new_tokens.get(id(seq))
            # A chunk that did not reach the prompt's end has nothing to report.
            if new is not None or seq.finished:
                outputs.append(self._output(seq, new or [], **extras.get(id(seq), {})))
        return self._mark_finished(outputs)

    def _fork_at_first_sample(
        self, logits: torch.Tensor, sampled: list[Sequence]
    ) -> tuple[torch.Tensor, list[Sequence], list[tuple[Sequence, list[Sequence]]]]:
        """The sequences that sample this step, their logits rows, and the forks.

        Sequences of n > 1 / best_of requests that sample for the first time (their
        prefill, and suffix, are done) fork: each child samples its own first token from
        the parent's logits (its row repeated). A branched prompt's prefill samples
        nothing itself: each branch takes its first token (or its suffix's first) from
        the prompt's logits in its place. Children join the scheduler once the step's
        compression is done (``Scheduler.fork`` / ``Scheduler.branch``).
        """
        forks = []
        rows: list[int] = []
        seqs: list[Sequence] = []
        for j, seq in enumerate(sampled):
            if seq.branches:
                children = [seq.branch_child(b) for b in seq.branches]
            else:
                rows.append(j)
                seqs.append(seq)
                if not seq.forks_pending or seq.pending_suffix or seq.sampling.max_tokens == 0:
                    continue
                children = [seq.child(i) for i in range(1, seq.forks_pending + 1)]
                self._requests[seq.request_id].extend(children)
            seqs.extend(children)
            rows.extend([j] * len(children))
            forks.append((seq, children))
        if forks:
            logits = logits[torch.tensor(rows, dtype=torch.long, device=logits.device)]
        return logits, seqs, forks

    def _mark_finished(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """``finished`` on the last output of each request whose sequences are all done
        (the request then leaves the engine); a best_of > n request's outputs are held
        back and its ranked choices come instead, once it is done."""
        done: dict[str, list[Sequence]] = {}
        for k in range(len(outputs) - 1, -1, -1):
            rid = outputs[k].request_id
            seqs = self._requests.get(rid)
            if seqs is not None and all(s.finished for s in seqs):
                done[rid] = self._requests.pop(rid)
                outputs[k] = outputs[k]._replace(finished=True)
        result = []
        for out in outputs:
            seqs = self._requests.get(out.request_id) or done.get(out.request_id)
            if not seqs or not seqs[0].sampling.ranks:
                result.append(out)
            elif out.finished:
                result.extend(self._best(seqs))
        return result

    def _best(self, seqs: list[Sequence]) -> list[RequestOutput]:
        """The final outputs of the ``n`` sequences with the highest cumulative logprob,
        as choices ``0..n-1`` (best first)."""
        n = seqs[0].sampling.n
        best = sorted(seqs, key=lambda s: (-s.cumulative_logprob, s.index))[:n]
        outs = [
            self._output(s, list(s.output_token_ids))._replace(index=rank)
            for rank, s in enumerate(best)
        ]
        outs[-1] = outs[-1]._replace(finished=True)
        return outs

    def _sample(
        self, logits: torch.Tensor, seqs: list[Sequence]
    ) -> tuple[list[int | None], list[TokenLogprob | None]]:
        """A token for each sequence (None for one that only scores its prompt, which is
        not sampled), and its logprobs where asked; other rows cost nothing more."""
        keep = [j for j, seq in enumerate(seqs) if seq.sampling.max_tokens > 0]
        lps: list[TokenLogprob | None] = [None] * len(seqs)
        if not keep:
            return [None] * len(seqs), lps
        if len(keep) < len(seqs):
            logits, seqs = logits[keep], [seqs[j] for j in keep]
        drawn = self.sampler(logits, [s.sampling for s in seqs], [s.generator for s in seqs])
        tokens: list[int | None] = [None] * len(lps)
        for j, token in zip(keep, drawn.tolist(), strict=True):
            tokens[j] = token
        # A row feeding its suffix draws nothing the request sees: no logprobs for it.
        # Ranked requests (best_of > n) need the sampled token's logprob too.
        want = [
            r
            for r, seq in enumerate(seqs)
            if (seq.sampling.logprobs is not None or seq.sampling.ranks) and not seq.pending_suffix
        ]
        if want:
            rows = torch.tensor(want, dtype=torch.long, device=logits.device)
            ks = [seqs[r].sampling.logprobs or 0 for r in want]
            for r, entry in zip(want, token_logprobs(logits[rows], drawn[rows], ks), strict=True):
                lps[keep[r]] = entry
        return tokens, lps

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self.scheduler.finish(seq)

    def _output(
        self,
        seq: Sequence,
        new_tokens: list[int],
        logprobs: list[TokenLogprob] | None = None,
        prompt_logprobs: list[TokenLogprob | None] | None = None,
        prompt_token_ids: list[int] | None = None,
    ) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            text=seq.output_text,
            new_token_ids=new_tokens,
            num_output_tokens=len(seq.output_token_ids),
            prompt_tokens=len(seq.prompt_token_ids),
            finished=False,  # set on the request's last output (see _mark_finished)
            finish_reason=seq.finish_reason,
            kv=seq.kv_stats,
            # The whole list is copied once, when the request ends, not every step.
            token_ids=list(seq.output_token_ids) if seq.finished else [],
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            prompt_token_ids=prompt_token_ids,
            index=seq.index,
            cumulative_logprob=seq.cumulative_logprob if seq.sampling.ranks else None,
        )

    # ------------------------------------------------------------------ statistics
    def kv_stats(self, seq: Sequence) -> KVStats:
        if self.ranks:
            return self.ranks.kv_stats(seq.slot, seq.compressions)
        return KVStats.of(self.cache, seq.slot, seq.compressions)

    def capacity(self) -> Capacity:
        """The KV cache: under tensor parallelism, every rank's pool and heads together."""
        cache = self.cache
        size = self.config.tensor_parallel_size
        free = (
            sum(r.blocks_free for r in self.ranks.reports([]))
            if self.ranks
            else cache.num_free_blocks
        )
        return Capacity(
            num_blocks=cache.config.num_blocks * size,
            free_blocks=free,
            block_size=cache.block_size,
            bytes_per_kv=cache.config.bytes_per_kv,
            heads=cache.num_layers * cache.num_kv_heads * size,
            max_num_seqs=self.config.max_num_seqs,
            max_model_len=self.max_model_len,
        )

    def stats(self) -> EngineStats:
        s = self.scheduler
        slots = [seq.slot for seq in s.running]
        # Counted on each rank from its block tables and pool (not from lengths: pool-used
        # minus held is a leak), and summed.
        ranks = self.ranks.reports(slots) if self.ranks else [RankBlocks.of(self.cache, slots)]
        mc = self.model_config
        seen = int(self.cache.seq_lens[slots].sum()) * mc.num_layers * mc.num_kv_heads
        return EngineStats(
            running=len(s.running),
            waiting=len(s.waiting),
            blocks_total=sum(r.blocks_total for r in ranks),
            blocks_free=sum(r.blocks_free for r in ranks),
            blocks_held=sum(r.blocks_held for r in ranks),
            blocks_peak=sum(r.blocks_peak for r in ranks),
            block_size=self.cache.block_size,
            kvs_kept=sum(r.kvs_kept for r in ranks),
            kvs_seen=seen,
            compression_passes=s.compression_passes,
            compression_seconds=s.compression_seconds,
            preemptions=s.preemptions,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            prefill_seconds=self.prefill_seconds,
            decode_seconds=self.decode_seconds,
            blocks_shared=sum(r.blocks_shared for r in ranks),
            blocks_distinct=sum(r.blocks_distinct for r in ranks),
            ranks=tuple(ranks) if self.ranks else (),
            swaps=s.swaps,
            swapped_bytes=s.swapped_bytes,
        )

    def reset_peak_memory(self) -> None:
        """Start ``stats().blocks_peak`` again from the blocks in use now."""
        if self.ranks:
            self.ranks.reset_peak()
        else:
            self.cache.pool.reset_peak()

    def check_health(self) -> None:
        """Raise :class:`~kvcompress.errors.WorkerFailedError` if a tensor-parallel rank is
        gone (then no step can run); never blocks, from any thread."""
        if self.ranks:
            self.ranks.check_health()

    def close(self) -> None:
        """Stop the engine's tensor-parallel ranks (nothing to do on one device); the engine
        cannot step afterwards. Also done when the engine is collected and at exit."""
        if self.ranks:
            self._finalizer()

    def to_transformers(self) -> torch.nn.Module:
        """transformers' own implementation of this model, holding the same weights (for
        parity checks and speed baselines)."""
        from kvcompress.models.hf_reference import to_transformers

        if self.ranks:
            raise InvalidParameterError(
                "to_transformers needs the whole model on one device: use tensor_parallel_size=1",
                param="tensor_parallel_size",
            )
        return to_transformers(self.runner.model, self.model_config)
