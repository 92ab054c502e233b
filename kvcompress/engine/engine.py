"""The engine: requests in, one batched model step at a time, outputs out."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from kvcompress.attention import TorchAttentionBackend
from kvcompress.cache import CacheConfig, PagedKVCache
from kvcompress.compress import CompressionParams, Compressor
from kvcompress.engine.config import EngineConfig
from kvcompress.engine.detokenizer import detokenize_step
from kvcompress.engine.model_runner import ModelRunner
from kvcompress.engine.sampling import Sampler, SamplingParams
from kvcompress.engine.scheduler import Scheduler
from kvcompress.engine.sequence import KVStats, RequestOutput, Sequence, SequenceStatus
from kvcompress.models import load_model

logger = logging.getLogger(__name__)


class EngineStats(NamedTuple):
    running: int
    waiting: int
    blocks_total: int
    blocks_free: int
    block_size: int
    kvs_kept: int  # KVs held by running sequences
    kvs_seen: int  # KVs written by running sequences
    compression_passes: int
    compression_seconds: float
    preemptions: int
    prompt_tokens: int  # processed since start
    generation_tokens: int  # generated since start
    prefill_seconds: float  # model time in prefill steps since start
    decode_seconds: float  # model time in decode steps since start


def merge_compression(
    default: CompressionParams, override: CompressionParams | Mapping[str, Any] | None
) -> CompressionParams:
    """A request's compression parameters: its own fields over the engine's defaults.

    Giving one budget (``compression_rate`` or ``max_cache_tokens``) replaces the default's
    budget of the other kind, since the two are exclusive.
    """
    if override is None:
        return default
    if isinstance(override, CompressionParams):
        return override
    fields = {f.name for f in dataclasses.fields(CompressionParams)}
    unknown = set(override) - fields
    if unknown:
        raise ValueError(f"unknown compression fields: {', '.join(sorted(unknown))}")
    given = {k: v for k, v in override.items() if v is not None}
    if "compression_rate" in given:
        given.setdefault("max_cache_tokens", None)
    if "max_cache_tokens" in given:
        given.setdefault("compression_rate", None)
    return dataclasses.replace(default, **given)


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **kwargs: Any) -> None:
        self.config = config = config or EngineConfig(**kwargs)
        self.device = torch.device(config.device)
        loaded = load_model(config.model, dtype=config.dtype, device=self.device)
        self.model_config = mc = loaded.config
        self.tokenizer = loaded.tokenizer
        self.max_model_len = min(
            config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings
        )
        cache_config = CacheConfig(
            num_layers=mc.num_layers,
            num_kv_heads=mc.num_kv_heads,
            head_dim=mc.head_dim,
            kv_cache_memory=config.kv_cache_memory,
            block_size=config.block_size,
            dtype=config.dtype,
            device=self.device,
            max_seqs=config.max_num_seqs,
            max_model_len=self.max_model_len,
        )
        self.cache = PagedKVCache(cache_config)
        self.backend = TorchAttentionBackend(self.cache, config.metric)
        loaded.model.set_attention_backend(self.backend)
        self.compressor = Compressor(self.cache, config.max_kvs_per_pass, seed=config.seed)
        self.scheduler = Scheduler(config, self.cache, self.compressor)
        self.runner = ModelRunner(loaded.model, self.cache, self.device)
        self.sampler = Sampler(config.seed)
        self.eos_token_ids = set(mc.eos_token_ids)
        self._requests: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0
        self.last_teacher_force_stats: KVStats | None = None

    # ------------------------------------------------------------------ requests
    def tokenize(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template")
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def add_request(
        self,
        prompt: str | list[int],
        sampling: SamplingParams | None = None,
        compression: CompressionParams | Mapping[str, Any] | None = None,
        request_id: str | None = None,
        suffix: str | list[int] | None = None,
    ) -> str:
        """Queue a request; returns its id. Raises ValueError for a request that can never run.

        ``suffix`` (optional) is fed after the prompt has been prefilled and compressed, one
        token per decode step, before generation starts: for example a question added to a
        context that was compressed without seeing it.
        """
        sampling = sampling or SamplingParams()
        params = merge_compression(self.config.compression, compression)
        token_ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if not token_ids:
            raise ValueError("the prompt is empty")
        if isinstance(suffix, str):
            suffix_ids = list(self.tokenizer(suffix, add_special_tokens=False)["input_ids"])
        else:
            suffix_ids = list(suffix or [])
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in token_ids + suffix_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if len(token_ids) + len(suffix_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids) + len(suffix_ids)} tokens; the model's context is "
                f"{self.max_model_len} tokens, including at least one generated token"
            )
        need = self.scheduler.prompt_blocks(len(token_ids))
        if need > self.cache.num_blocks:
            raise ValueError(
                f"the prompt needs {need} KV blocks ({len(token_ids)} tokens x "
                f"{self.scheduler.heads} heads) but the whole KV cache holds "
                f"{self.cache.num_blocks}; raise kv_cache_memory"
            )
        max_queue = self.config.max_queue
        if max_queue is not None and len(self.scheduler.waiting) >= max_queue:
            raise QueueFullError(f"the queue is full ({max_queue} requests waiting)")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        seq = Sequence(request_id, token_ids, sampling, params, pending_suffix=suffix_ids)
        self._requests[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def abort_request(self, request_id: str) -> bool:
        """Stop a request and free its blocks; False if it was unknown or already done."""
        seq = self._requests.pop(request_id, None)
        if seq is None or seq.finished:
            return False
        seq.finish_reason = "abort"
        self.scheduler.finish(seq)
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    # ------------------------------------------------------------------ step
    def step(self) -> list[RequestOutput]:
        """Run one batched step; returns outputs of the requests it advanced."""
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        outputs: list[RequestOutput] = []
        for seq in batch.exhausted:
            self._finish(seq, "length")
            outputs.append(self._output(seq))
        if not batch.seqs:
            return outputs
        start = time.perf_counter()
        try:
            logits = self.runner.run(batch.seqs, batch.is_prefill)
            tokens = self.sampler(
                logits, [s.sampling for s in batch.seqs], [s.generator for s in batch.seqs]
            ).tolist()
        except Exception:
            # The batch's requests end with reason "error" and their blocks return to the
            # pool; the engine and every other request carry on.
            logger.exception("engine step failed; ending its %d requests", len(batch.seqs))
            for seq in batch.seqs:
                self._finish(seq, "error")
                outputs.append(self._output(seq))
            return outputs
        elapsed = time.perf_counter() - start
        if batch.is_prefill:
            self.prompt_tokens += sum(s.num_tokens for s in batch.seqs)
            self.prefill_seconds += elapsed
        else:
            self.decode_seconds += elapsed
        for seq, token in zip(batch.seqs, tokens, strict=True):
            if seq.pending_suffix:  # still feeding the suffix: its next token, not a sample
                seq.prompt_token_ids.append(seq.pending_suffix.pop(0))
                continue
            seq.output_token_ids.append(token)
            self.generation_tokens += 1
            self._check_stop(seq, token)
        self.scheduler.after_step(batch)
        for seq in batch.seqs:
            if seq.finished and seq.slot is not None:
                seq.kv_stats = self.kv_stats(seq)
                self.scheduler.finish(seq)
                self._requests.pop(seq.request_id, None)
            outputs.append(self._output(seq))
        return outputs

    def _check_stop(self, seq: Sequence, token: int) -> None:
        sp = seq.sampling
        detokenize_step(self.tokenizer, seq.output_token_ids, seq.detokenizer)
        text = seq.detokenizer.text
        if (token in self.eos_token_ids and not sp.ignore_eos) or token in sp.stop_token_ids:
            seq.output_text = text
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = "stop"
            return
        for stop in sp.stop:
            at = text.find(stop)
            if at >= 0:
                seq.output_text = text[:at]
                seq.status = SequenceStatus.FINISHED
                seq.finish_reason = "stop"
                return
        seq.output_text = text
        if len(seq.output_token_ids) >= sp.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = "length"

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self.scheduler.finish(seq)
        self._requests.pop(seq.request_id, None)

    def _output(self, seq: Sequence) -> RequestOutput:
        return RequestOutput(
            seq.request_id,
            seq.output_text,
            list(seq.output_token_ids),
            len(seq.prompt_token_ids),
            seq.finished,
            seq.finish_reason,
            seq.kv_stats,
        )

    # ------------------------------------------------------------------ statistics
    def kv_stats(self, seq: Sequence) -> KVStats:
        cache = self.cache
        kept_grid = cache.kept_per_layer_head(seq.slot)
        kept = int(kept_grid.sum())
        seen = int(cache.seq_lens[seq.slot]) * self.scheduler.heads
        blocks = cache.blocks_held(seq.slot)
        physical = blocks * cache.block_size
        return KVStats(
            kvs_seen=seen,
            kvs_kept=kept,
            physical_kvs=physical,
            blocks=blocks,
            block_size=cache.block_size,
            compression_rate=seen / kept if kept else 1.0,
            physical_over_theoretical=physical / kept if kept else 1.0,
            kept_per_layer_head=kept_grid.tolist(),
            compressions=seq.compressions,
        )

    def stats(self) -> EngineStats:
        s = self.scheduler
        slots = [seq.slot for seq in s.running]
        kept = int(self.cache.context_lens[:, slots].sum()) if slots else 0
        seen = int(self.cache.seq_lens[slots].sum()) * s.heads if slots else 0
        return EngineStats(
            running=len(s.running),
            waiting=len(s.waiting),
            blocks_total=self.cache.num_blocks,
            blocks_free=self.cache.num_free_blocks,
            block_size=self.cache.block_size,
            kvs_kept=kept,
            kvs_seen=seen,
            compression_passes=s.compression_passes,
            compression_seconds=s.compression_seconds,
            preemptions=s.preemptions,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            prefill_seconds=self.prefill_seconds,
            decode_seconds=self.decode_seconds,
        )

    @torch.inference_mode()
    def teacher_force(
        self,
        prefix: list[int],
        continuation: list[int],
        compression: CompressionParams | Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        """Logits ``[len(continuation), vocab]`` predicting each continuation token.

        The prefix is prefilled and compressed once with the given parameters; then the true
        continuation is fed one token per decode step, exactly as generation would, so the
        logits show what a compressed cache does to the next-token distribution. Runs alone:
        the engine must have no requests in flight.
        """
        if self.has_unfinished_requests():
            raise RuntimeError("teacher_force needs an idle engine")
        if not prefix or not continuation:
            raise ValueError("prefix and continuation must both be non-empty")
        params = merge_compression(self.config.compression, compression)
        seq = Sequence("teacher-force", list(prefix), SamplingParams(), params)
        total = len(prefix) + len(continuation) - 1
        if total > self.max_model_len:
            raise ValueError(f"{total} tokens exceed the model context of {self.max_model_len}")
        seq.slot = self.cache.allocate_seq()
        try:
            rows = [self.runner.run([seq], is_prefill=True)[0]]
            if params.evicts:
                self.compressor.compress([seq.slot], [params])
            for token in continuation[:-1]:
                seq.output_token_ids.append(token)
                rows.append(self.runner.run([seq], is_prefill=False)[0])
            seq.kv_stats = self.kv_stats(seq)
        finally:
            self.cache.free_seq(seq.slot)
        self.last_teacher_force_stats = seq.kv_stats
        return torch.stack(rows).float()

    def run_until_done(self, on_output=None) -> None:
        while self.has_unfinished_requests():
            for out in self.step():
                if on_output is not None:
                    on_output(out)


class QueueFullError(RuntimeError):
    """The waiting queue is at ``max_queue``; try again later."""
