"""Run a batch of requests through an engine and measure what happened."""

from __future__ import annotations

import time
from typing import NamedTuple

import torch

from kvcompress.compress import CompressionParams
from kvcompress.engine import LLMEngine, SamplingParams


def auto_device(device: str | None) -> str:
    """A benchmark's device: ``device``, or CUDA when there is one."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


class RunResult(NamedTuple):
    seconds: float
    prompt_tokens: int
    output_tokens: int
    prefill_seconds: float
    decode_seconds: float
    compression_seconds: float
    peak_running: int
    peak_blocks_used: int
    preemptions: int
    # Under tensor parallelism, each rank's own high-water mark (they sum to the above).
    peak_blocks_per_rank: tuple[int, ...] = ()
    swaps: int = 0  # of the preemptions, those that swapped out (the others recompute)

    @property
    def total_tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.seconds

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def run_all(
    engine: LLMEngine,
    prompts: list[list[int]],
    output_len: int,
    compression: CompressionParams | None = None,
) -> RunResult:
    """Submit every prompt at once (each generating exactly ``output_len`` tokens) and run
    the engine until all finish.

    The peak is the pool's own high-water mark: it is reached between a prefill chunk's
    append and its compression, inside a step, where sampling after each output never looks.
    """
    engine.reset_peak_memory()
    before = engine.stats()
    sampling = SamplingParams(max_tokens=output_len, ignore_eos=True)
    for prompt in prompts:
        engine.add_request(prompt, sampling, compression)
    peak_running = 0
    output_tokens = 0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        outputs = engine.step()
        # Once per step: the statistics scan the block tables.
        peak_running = max(peak_running, engine.stats().running)
        output_tokens += sum(out.num_output_tokens for out in outputs if out.finished)
    seconds = time.perf_counter() - start
    after = engine.stats()
    return RunResult(
        seconds=seconds,
        prompt_tokens=sum(len(p) for p in prompts),
        output_tokens=output_tokens,
        prefill_seconds=after.prefill_seconds - before.prefill_seconds,
        decode_seconds=after.decode_seconds - before.decode_seconds,
        compression_seconds=after.compression_seconds - before.compression_seconds,
        peak_running=peak_running,
        peak_blocks_used=after.blocks_peak,
        preemptions=after.preemptions - before.preemptions,
        swaps=after.swaps - before.swaps,
        peak_blocks_per_rank=tuple(r.blocks_peak for r in after.ranks),
    )
