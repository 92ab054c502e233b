"""Generation requests of a sweep, run through the engine's one drive loop.

A job's prompt comes in two parts. By default both are prefilled together, so the
eviction metric's observation window sees the question (query-aware compression, as in
the paper). With ``compress_context_only`` the question is passed as the request's
``suffix``: the engine compresses the context first and only then feeds the question,
the harder setting where the cache cannot know what will be asked. The token ids are the
same in both modes; only the moment of compression differs.

Jobs are submitted together and the engine batches them, but no more at once than the KV
cache holds uncompressed (prompt + suffix + generation budget): the engine would
otherwise relieve memory pressure by compressing again mid-decode, or by preemption, and
the sweep would measure the scheduler instead of the policy.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from kvcompress.compress import CompressionParams
from kvcompress.eval.prompts import PromptIds

if TYPE_CHECKING:
    from kvcompress.engine import LLMEngine, RequestOutput

__all__ = ["Job", "make_progress", "run_jobs"]


class Job(NamedTuple):
    """One generation request; `key` routes its output back to the caller."""

    key: Any
    prompt: PromptIds
    max_new_tokens: int
    compression: CompressionParams
    compress_context_only: bool


# Inference mode: nothing here needs autograd, and the engine's compressor reuses
# workspace buffers that `teacher_force` (itself in inference mode) may have created;
# such inference tensors cannot be updated in place outside inference mode.
@torch.inference_mode()
def run_jobs(
    engine: LLMEngine,
    jobs: Iterable[Job],
    on_done: Callable[[Job, RequestOutput], None],
    progress: Any = None,
) -> None:
    """Run every job through the engine, batched, and hand each finished output back.

    Jobs are admitted while their uncompressed worst case fits in the cache (see the
    module docstring): before the loop, and each time a job finishes; outputs come back
    in completion order.
    """
    from kvcompress.engine import SamplingParams

    pending = deque(jobs)
    in_flight: dict[str, tuple[Job, int]] = {}  # request id -> (job, blocks reserved)
    capacity = engine.capacity()

    def admit() -> None:
        while pending and len(in_flight) < capacity.max_num_seqs:
            job = pending[0]
            total = len(job.prompt.context) + len(job.prompt.question) + job.max_new_tokens
            need = capacity.blocks_for(total)
            used = sum(blocks for _, blocks in in_flight.values())
            if in_flight and used + need > capacity.num_blocks:
                return
            pending.popleft()
            if job.compress_context_only:
                prompt, suffix = job.prompt.context, job.prompt.question
            else:
                prompt, suffix = job.prompt.context + job.prompt.question, None
            sampling = SamplingParams(max_tokens=job.max_new_tokens, temperature=0.0)
            request_id = engine.add_request(prompt, sampling, job.compression, suffix=suffix)
            in_flight[request_id] = (job, need)

    admit()
    # Jobs admitted inside the loop join the engine's next step.
    for out in engine.run():
        if out.finished and out.request_id in in_flight:
            job, _ = in_flight.pop(out.request_id)
            on_done(job, out)
            if progress is not None:
                progress.update(1)
            admit()


def make_progress(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar on stderr (never stdout, which may carry the JSON document)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=not enabled, unit="req")
