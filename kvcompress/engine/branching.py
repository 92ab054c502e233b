"""Branched prompts: one prefill, several requests compressed each their own way.

``add_branched_request`` queues one request per set of compression parameters, all from
one prefill of their prompt (what ``kvcompress eval`` runs for the (policy, rate) pairs of
a prompt). The prefill is a sequence of its own (``Sequence.branches``) that the scheduler
admits whole, never compresses, and forks at its end (``Scheduler.branch``); the step
samples each branch's first token from its logits (``LLMEngine._fork_at_first_sample``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from kvcompress.compress import CompressionParams, shared_prefill_signature
from kvcompress.engine.admission import check_branches_fit
from kvcompress.engine.sampling import SamplingParams
from kvcompress.engine.sequence import Branch, Sequence, prefill_params
from kvcompress.errors import InvalidParameterError

if TYPE_CHECKING:
    from kvcompress.engine.engine import LLMEngine


class EngineBranching:
    """Mixed into :class:`LLMEngine`."""

    def add_branched_request(
        self: LLMEngine,
        prompt: str | list[int],
        sampling: SamplingParams | None,
        branches: list[CompressionParams | Mapping[str, Any] | None],
        request_ids: list[str | None] | None = None,
        suffix: str | list[int] | None = None,
    ) -> list[str]:
        """Queue one request per branch, all of one prompt prefilled once; returns their
        ids, in the order of ``branches``.

        The prompt is prefilled whole, in one chunk (whatever ``prefill_chunk_size``) and
        uncompressed, collecting the metric the branches compress by; it then forks
        before any compression into one sequence per branch, sharing its blocks, and each
        is compressed by its own parameters exactly as an ordinary request whose prefill
        chunk covered the whole prompt is (the same compression call). From there each is
        an ordinary request: its own sampling (every branch samples its first token from
        the prompt's logits), suffix, preemption and :meth:`abort_request`.

        Branches share a prefill only when it collects what each needs
        (``CompressionParams.prefill_signature``: the metric's power and collection
        settings; branches that do not score by the metric fit any): others are refused
        with an ``InvalidParameterError``. ``n``/``best_of`` and ``prompt_logprobs`` are
        refused (add such requests alone), as is a prompt whose uncompressed prefill plus
        the branches' copies could never fit the cache (``KVBudgetError``).
        """
        sampling = sampling or SamplingParams()
        if not branches:
            raise InvalidParameterError("give at least one branch", param="branches")
        params = [self.resolve_compression(b) for b in branches]
        shared_prefill_signature(params)
        if sampling.num_seqs > 1:
            raise InvalidParameterError(
                "n and best_of cannot be combined with branches (each branch is one sequence)",
                param="best_of" if sampling.ranks else "n",
            )
        if sampling.prompt_logprobs is not None:
            raise InvalidParameterError(
                "prompt_logprobs cannot be combined with branches", param="prompt_logprobs"
            )
        if len(params) + 1 > self.config.max_num_seqs:
            raise InvalidParameterError(
                f"{len(params)} branches and their prefill exceed the engine's max_num_seqs "
                f"({self.config.max_num_seqs})",
                param="branches",
            )
        token_ids, suffix_ids = self._prompt_ids(prompt, suffix, sampling)
        check_branches_fit(
            self.capacity(), params, len(token_ids) + len(suffix_ids), sampling.max_tokens
        )
        self._check_queue()
        if request_ids is not None and len(request_ids) != len(params):
            raise InvalidParameterError(
                f"{len(request_ids)} request ids for {len(params)} branches", param="request_id"
            )
        ids = self._new_ids(request_ids or [None] * len(params))
        branch_list = [Branch(i, p) for i, p in zip(ids, params, strict=True)]
        parent = Sequence(
            f"{ids[0]}:prefill",
            token_ids,
            sampling,
            prefill_params(branch_list),
            pending_suffix=suffix_ids,
            branches=branch_list,
        )
        for request_id in ids:
            self._requests[request_id] = [parent]
        self.scheduler.add(parent)
        return ids
