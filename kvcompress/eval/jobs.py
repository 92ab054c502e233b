"""Generation requests of a sweep, run through the engine's one drive loop.

A job's prompt comes in two parts. By default both are prefilled together, so the
eviction metric's observation window sees the question (query-aware compression, as in
the paper). With ``compress_context_only`` the question is passed as the request's
``suffix``: the engine compresses the context first and only then feeds the question,
the harder setting where the cache cannot know what will be asked. The token ids are the
same in both modes; only the moment of compression differs.

Shared prefill (the default): the jobs of one prompt that evict are submitted together as
one branched request (``LLMEngine.add_branched_request``), one per group of jobs whose
prefill collects the same metric (``CompressionParams.prefill_signature``: kvcompress,
uniform, pyramid and the position or random policies share one, h2o's L1 metric needs
another). The prompt is prefilled once, whole, and each job's branch is compressed
exactly as a one-shot prefill would compress it, whatever the engine's prefill chunk
size. Jobs that evict nothing (the ``full`` reference) stay requests of their own. With
``shared_prefill=False`` every job is its own request, prefilled (in chunks, compressed
between them) as a served request is.

Jobs are submitted together and the engine batches them, but no more at once than the KV
cache holds what they may hold: a job alone reserves its prompt, suffix and generation
budget uncompressed; a branched group its prompt uncompressed plus each branch's
compressed copy, or what the branches hold as they generate. The engine would otherwise
relieve memory pressure by compressing again mid-decode, or by preemption, and the sweep
would measure the scheduler instead of the policy.
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
    from kvcompress.engine import Capacity, LLMEngine, RequestOutput

__all__ = ["Job", "make_progress", "plan_submissions", "run_jobs"]


class Job(NamedTuple):
    """One generation request; `key` routes its output back to the caller."""

    key: Any
    prompt: PromptIds
    max_new_tokens: int
    compression: CompressionParams
    compress_context_only: bool


class _Submission(NamedTuple):
    """Jobs submitted as one engine call: one request, or the branches of one prefill."""

    jobs: list[Job]
    branched: bool


def plan_submissions(
    jobs: Iterable[Job], shared_prefill: bool, max_branches: int
) -> list[_Submission]:
    """The engine calls that run ``jobs``, in the order of their first job.

    With ``shared_prefill``, the evicting jobs of one prompt (same ids, suffix mode and
    generation budget) are grouped by prefill signature; jobs that read no metric join the
    prompt's first group. Groups are cut to ``max_branches``.
    """
    if not shared_prefill:
        return [_Submission([job], False) for job in jobs]
    order: list[Any] = []  # a prompt's own jobs, or its groups by signature
    prompts: dict[tuple, dict[Any, list[Job]]] = {}
    for job in jobs:
        if not job.compression.evicts:
            order.append([job])
            continue
        key = (
            tuple(job.prompt.context),
            tuple(job.prompt.question),
            job.max_new_tokens,
            job.compress_context_only,
        )
        groups = prompts.setdefault(key, {})
        signature = job.compression.prefill_signature()
        if signature is None and groups:
            signature = next(iter(groups))  # reads no metric: any prefill serves it
        elif signature is not None and None in groups:
            # The metric-free jobs met first wait for a group that collects one.
            groups[signature] = groups.pop(None)
        if signature not in groups:
            groups[signature] = []
            order.append(groups[signature])
        groups[signature].append(job)
    return [
        _Submission(group[i : i + max_branches], group[0].compression.evicts)
        for group in order
        for i in range(0, len(group), max_branches)
    ]


# Inference mode: nothing here needs autograd, and the engine's compressor reuses
# workspace buffers that `teacher_force` (itself in inference mode) may have created;
# such inference tensors cannot be updated in place outside inference mode.
@torch.inference_mode()
def run_jobs(
    engine: LLMEngine,
    jobs: Iterable[Job],
    on_done: Callable[[Job, RequestOutput], None],
    progress: Any = None,
    shared_prefill: bool = True,
) -> None:
    """Run every job through the engine, batched, and hand each finished output back.

    Jobs are submitted as :func:`plan_submissions` groups them and admitted while what
    they may hold fits in the cache (see the module docstring): before the loop, and each
    time a submission's last job finishes; outputs come back in completion order.
    """
    from kvcompress.engine import SamplingParams

    capacity = engine.capacity()
    # A branched prompt's prefill takes a sequence row of its own until it forks.
    pending = deque(plan_submissions(jobs, shared_prefill, capacity.max_num_seqs - 1))
    in_flight: dict[str, tuple[Job, int]] = {}  # request id -> (job, its submission)
    reserved: dict[int, int] = {}  # submission -> blocks reserved
    left: dict[int, int] = {}  # submission -> jobs still running
    submitted = 0

    def admit() -> None:
        nonlocal submitted
        while pending:
            sub = pending[0]
            need = _reservation(capacity, sub)
            rows = len(sub.jobs) + sub.branched
            if in_flight and (
                sum(reserved.values()) + need > capacity.num_blocks
                or len(in_flight) + rows > capacity.max_num_seqs
            ):
                return
            pending.popleft()
            job = sub.jobs[0]
            if job.compress_context_only:
                prompt, suffix = job.prompt.context, job.prompt.question
            else:
                prompt, suffix = job.prompt.context + job.prompt.question, None
            sampling = SamplingParams(max_tokens=job.max_new_tokens, temperature=0.0)
            if sub.branched:
                branches = [j.compression for j in sub.jobs]
                ids = engine.add_branched_request(prompt, sampling, branches, suffix=suffix)
            else:
                ids = [engine.add_request(prompt, sampling, job.compression, suffix=suffix)]
            for request_id, j in zip(ids, sub.jobs, strict=True):
                in_flight[request_id] = (j, submitted)
            reserved[submitted], left[submitted] = need, len(ids)
            submitted += 1

    admit()
    # Jobs admitted inside the loop join the engine's next step.
    for out in engine.run():
        if out.finished and out.request_id in in_flight:
            job, sub = in_flight.pop(out.request_id)
            on_done(job, out)
            if progress is not None:
                progress.update(1)
            left[sub] -= 1
            if not left[sub]:
                del reserved[sub], left[sub]
                admit()


def _reservation(capacity: Capacity, sub: _Submission) -> int:
    """Blocks a submission may hold at once (see the module docstring)."""
    job = sub.jobs[0]
    prompt = len(job.prompt.context) + len(job.prompt.question)
    if not sub.branched:
        return capacity.blocks_for(prompt + job.max_new_tokens)
    kept = [capacity.blocks_compressed(j.compression, prompt) for j in sub.jobs]
    # Each branch grows by its generation budget, plus a copied partial tail per head.
    grow = capacity.blocks_for(job.max_new_tokens + capacity.block_size)
    return max(capacity.blocks_for(prompt) + sum(kept), sum(kept) + len(kept) * grow)


def make_progress(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar on stderr (never stdout, which may carry the JSON document)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=not enabled, unit="req")
