"""The engine's analysis calls: one sequence run alone, outside the queues.

``teacher_force`` (fidelity: logits of a compressed cache on a known continuation) and
``inspect_kept`` (which KVs each head keeps) share the engine's model, cache and compression
triggers, but never its scheduler's queues, so they need an idle engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from kvcompress.compress import CompressionParams, KeptKVs, kept_kvs
from kvcompress.engine.outputs import TeacherForceResult
from kvcompress.engine.sampling import SamplingParams
from kvcompress.engine.scheduler import ScheduledBatch
from kvcompress.engine.sequence import Sequence
from kvcompress.errors import ContextLengthError, InvalidParameterError, KVBudgetError

if TYPE_CHECKING:
    from kvcompress.engine.engine import LLMEngine


class EngineAnalysis:
    """Mixed into :class:`LLMEngine`."""

    @torch.inference_mode()
    def teacher_force(
        self: LLMEngine,
        prefix: list[int],
        continuation: list[int],
        compression: CompressionParams | Mapping[str, Any] | None = None,
    ) -> TeacherForceResult:
        """Logits predicting each continuation token, and the KV statistics at the end.

        The prefix is prefilled and compressed once with the given parameters; then the true
        continuation is fed one token per decode step, exactly as generation would, so the
        logits show what a compressed cache does to the next-token distribution. Runs alone:
        the engine must have no requests in flight.
        """
        if self.has_unfinished_requests():
            raise RuntimeError("teacher_force needs an idle engine")
        if not prefix or not continuation:
            raise InvalidParameterError(
                "prefix and continuation must both be non-empty", param="prompt"
            )
        params = self.resolve_compression(compression)
        seq = Sequence("teacher-force", list(prefix), SamplingParams(), params)
        total = len(prefix) + len(continuation) - 1
        if total > self.max_model_len:
            raise ContextLengthError(
                f"{total} tokens exceed the model context of {self.max_model_len}", param="prompt"
            )
        seq.slot = self.cache.allocate_seq()
        try:
            rows = self._prefill_alone(seq)
            for token in continuation[:-1]:
                seq.append_token(token)
                rows.extend(self._run_alone(seq, 1, decode=True))
            kv = self.kv_stats(seq)
        finally:
            self.cache.free_seq(seq.slot)
        return TeacherForceResult(torch.stack(rows).float(), kv)

    @torch.inference_mode()
    def inspect_kept(
        self: LLMEngine,
        prompt: list[int],
        compression: CompressionParams | Mapping[str, Any] | None = None,
    ) -> KeptKVs:
        """Which KVs of a prompt each (layer, KV head) keeps once prefilled and compressed
        (chunk by chunk, as a request would be), with their metric. Runs alone: the engine
        must have no requests in flight."""
        if self.has_unfinished_requests():
            raise RuntimeError("inspect_kept needs an idle engine")
        if self.ranks:  # kept_kvs reads one cache; each rank holds only its heads
            raise InvalidParameterError(
                "inspect_kept runs on one device: use tensor_parallel_size=1",
                param="tensor_parallel_size",
            )
        if not prompt:
            raise InvalidParameterError("the prompt is empty", param="prompt")
        seq = Sequence(
            "inspect", list(prompt), SamplingParams(), self.resolve_compression(compression)
        )
        seq.slot = self.cache.allocate_seq()
        try:
            self._prefill_alone(seq)
            return kept_kvs(self.cache, seq.slot)
        finally:
            self.cache.free_seq(seq.slot)

    def _prefill_alone(self: LLMEngine, seq: Sequence) -> list[torch.Tensor]:
        """Prefill one sequence outside the queues, chunk by chunk with the usual
        compressions; the logits after its last token."""
        rows = []
        while not seq.prefilled:
            rows.extend(self._run_alone(seq, self.scheduler.chunk_alone(seq), decode=False))
        return rows

    def _run_alone(self: LLMEngine, seq: Sequence, n: int, decode: bool) -> list[torch.Tensor]:
        """One step of one sequence outside the scheduler's queues (teacher forcing): its
        logits if the step reached its last token, with the usual compression triggers."""
        if n == 0:
            raise KVBudgetError("the KV cache cannot hold the next chunk", param="prompt")
        sample = [0] if n == seq.num_uncomputed else []
        batch = ScheduledBatch([seq], [n], int(decode), sample, [])
        logits = self.runner.run(batch.seqs, batch.num_tokens, batch.num_decode, sample).logits
        seq.num_computed += n
        self.scheduler.after_step(batch)
        return [logits[0]] if sample else []
