"""``kvcompress bench longctx``: prompts far longer than the KV budget, in bounded memory.

Each prompt length runs as one request on an engine whose KV cache could not hold the
longer prompts uncompressed. Chunked prefill compresses between chunks when the pool needs
their blocks (or after every chunk, ``--prefill-compression every-chunk``), so the peak KV
memory should stay flat in the prompt length (the pool, or the budget plus one chunk) and
the prefill time grow about linearly (each chunk attends to a bounded cache).

What chunking costs in quality is measured against a second engine with room for the full
cache: the prompt is teacher-forced as the prefix and the next tokens of the same text as
the continuation, (a) chunked under the budget, (b) with the full cache and (c) prefilled
in one chunk and compressed once. Top-1 agreement of (a) and (c) with (b) shows whether
compressing before the whole prompt is seen loses anything over compressing once after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from kvcompress.bench.engine_run import run_all
from kvcompress.bench.workload import text_prompts
from kvcompress.cache import parse_size
from kvcompress.compress import CompressionParams
from kvcompress.engine import EngineConfig, LLMEngine
from kvcompress.eval import top1_agreement


@dataclass(frozen=True)
class LongctxBenchConfig:
    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    output_len: int = 32
    agreement_tokens: int = 64
    kv_cache_memory: str = "24MiB"
    max_cache_tokens: int = 256
    reference_memory: str = "2GiB"  # the full cache of the longest prompt must fit
    reference: bool = True  # the agreement columns (a second engine)
    prefill_chunk_size: int | None = None  # None: the engine's default for the device
    # When the budget engine compresses a prompt's chunks (EngineConfig.prefill_compression).
    prefill_compression: str = EngineConfig.prefill_compression
    model: str | None = None
    device: str = "cpu"
    # What the budget runs use besides max_cache_tokens.
    compression: CompressionParams = field(default_factory=CompressionParams)

    def __post_init__(self) -> None:
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"lengths must be >= 1, got {self.lengths}")
        # The first token comes from the prefill: decode tokens/s needs a second one.
        if self.output_len < 2:
            raise ValueError(f"output_len must be >= 2, got {self.output_len}")
        if self.agreement_tokens < 1 or self.max_cache_tokens < 1:
            raise ValueError("agreement_tokens and max_cache_tokens must be >= 1")
        if self.prefill_chunk_size is not None and self.prefill_chunk_size < 1:
            raise ValueError(f"prefill_chunk_size must be >= 1, got {self.prefill_chunk_size}")
        parse_size(self.kv_cache_memory)
        parse_size(self.reference_memory)

    @property
    def params(self) -> CompressionParams:
        """The budget runs' parameters: the base with the fixed ``max_cache_tokens``."""
        return self.compression.with_overrides(max_cache_tokens=self.max_cache_tokens)


class LongctxResult(NamedTuple):
    rows: list[dict]
    engine: dict[str, Any]  # what the engine resolved: chunk size, blocks, context


def prompt_lengths(cfg: LongctxBenchConfig, max_model_len: int) -> list[int]:
    """The lengths, ascending, the longest capped so that prompt + output fits the context
    (add_request refuses a prompt that leaves no room for its output)."""
    cap = max_model_len - cfg.output_len - 1
    if cap < 1:
        raise ValueError(f"output_len {cfg.output_len} leaves no room in a {max_model_len} context")
    return sorted({min(n, cap) for n in cfg.lengths})


def _engine(cfg: LongctxBenchConfig, memory: str, chunk: int | None) -> LLMEngine:
    batched = max(EngineConfig.max_num_batched_tokens, chunk or 0)
    return LLMEngine(
        EngineConfig(
            model=cfg.model,
            device=cfg.device,
            kv_cache_memory=memory,
            max_num_seqs=1,  # one request at a time
            prefill_chunk_size=chunk,
            prefill_compression=cfg.prefill_compression,
            max_num_batched_tokens=batched,
        )
    )


def _agreement(
    engine: LLMEngine,
    reference: LLMEngine,
    prompt: list[int],
    continuation: list[int],
    params: CompressionParams,
) -> dict[str, Any]:
    full = params.with_overrides(policy="full", max_cache_tokens=None, compression_rate=None)
    ref = reference.teacher_force(prompt, continuation, full).logits
    chunked = engine.teacher_force(prompt, continuation, params).logits
    # The reference engine's chunk holds the whole prompt: prefilled, then compressed once.
    one_shot = reference.teacher_force(prompt, continuation, params).logits
    a_chunked = top1_agreement(ref, chunked)
    a_one_shot = top1_agreement(ref, one_shot)
    return {
        "agreement_positions": len(continuation),
        "agreement_chunked": a_chunked,
        "agreement_one_shot": a_one_shot,
        "agreement_diff": a_chunked - a_one_shot,
    }


def run_longctx_bench(cfg: LongctxBenchConfig) -> LongctxResult:
    engine = _engine(cfg, cfg.kv_cache_memory, cfg.prefill_chunk_size)
    capacity = engine.capacity()
    lengths = prompt_lengths(cfg, engine.max_model_len)
    longest = lengths[-1]
    # One text for every length: each prompt is its start, its continuation what follows.
    ids = text_prompts(engine.tokenizer, 1, longest + cfg.agreement_tokens)[0]
    params = cfg.params
    run_all(engine, [ids[: lengths[0]]], 2, params)  # warm-up: first-touch allocations
    reference = _engine(cfg, cfg.reference_memory, longest) if cfg.reference else None

    rows: list[dict] = []
    for n in lengths:
        result = run_all(engine, [ids[:n]], cfg.output_len, params)
        peak = result.peak_blocks_used * capacity.bytes_per_block
        per_1k = result.prefill_seconds * 1000 / n
        # The goals as ratios to the shortest prompt: peak memory flat in the prompt length,
        # prefill time linear in it (flat seconds per 1k tokens).
        base = rows[0] if rows else {"peak_kv_bytes": peak, "prefill_s_per_1k": per_1k}
        row: dict[str, Any] = {
            "prompt_tokens": n,
            "peak_kv_bytes": peak,
            "peak_vs_shortest": peak / base["peak_kv_bytes"],
            # What the prompt alone would hold uncompressed, for contrast with the budget.
            "uncompressed_kv_bytes": capacity.blocks_for(n) * capacity.bytes_per_block,
            "prefill_s": result.prefill_seconds,
            "prefill_s_per_1k": per_1k,
            "per_1k_vs_shortest": per_1k / base["prefill_s_per_1k"],
            "prefill_tok_s": n / result.prefill_seconds,
            "decode_tok_s": (cfg.output_len - 1) / result.decode_seconds,
            "preemptions": result.preemptions,
        }
        if reference is not None:
            # teacher_force feeds prefix + continuation - 1 tokens: shorten the continuation
            # where the context ends (only at a length capped by the context).
            room = engine.max_model_len - n + 1
            continuation = ids[n : n + min(cfg.agreement_tokens, room)]
            row |= _agreement(engine, reference, ids[:n], continuation, params)
        rows.append(row)
    info = {
        "chunk_size": engine.config.chunk_size,
        "max_model_len": engine.max_model_len,
        "num_blocks": capacity.num_blocks,
        "bytes_per_block": capacity.bytes_per_block,
        "budget_bytes": capacity.num_blocks * capacity.bytes_per_block,
        "heads": capacity.heads,
        "lengths": lengths,
        "compression": params,
    }
    return LongctxResult(rows, info)
