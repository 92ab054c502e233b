"""The job driver on a stand-in engine: admission under the KV budget, the drive loop, and how
a prompt's question reaches the engine."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kvcompress.compress import CompressionParams
from kvcompress.engine import Capacity
from kvcompress.eval.jobs import Job, run_jobs
from kvcompress.eval.prompts import PromptIds


class StubEngine:
    """Takes `steps` steps per request and records how many ran together at each step.

    Only the public API that `run_jobs` may use: `capacity`, `add_request` and `run`.
    """

    def __init__(self, num_blocks: int, max_num_seqs: int = 8, steps: int = 2) -> None:
        self.cap = Capacity(num_blocks, num_blocks, 4, 1, 2, max_num_seqs, 4096)
        self.steps = steps
        self.requests: list[dict] = []
        self.running: dict[str, int] = {}
        self.batch_sizes: list[int] = []

    def capacity(self) -> Capacity:
        return self.cap

    def add_request(self, prompt, sampling, compression, suffix=None) -> str:
        request_id = f"req-{len(self.requests)}"
        self.requests.append(
            {"prompt": prompt, "suffix": suffix, "sampling": sampling, "compression": compression}
        )
        self.running[request_id] = self.steps
        return request_id

    def run(self):
        while self.running:
            self.batch_sizes.append(len(self.running))
            for request_id in list(self.running):
                self.running[request_id] -= 1
                finished = self.running[request_id] == 0
                if finished:
                    del self.running[request_id]
                yield SimpleNamespace(request_id=request_id, finished=finished)


def jobs(count: int, context_only: bool = False) -> list[Job]:
    # 6 + 2 prompt tokens + 4 generated = 12 tokens: 3 blocks of 4 in each of 2 heads.
    prompt = PromptIds(list(range(6)), [7, 8])
    params = CompressionParams(compression_rate=4, min_cache_tokens=0)
    return [Job(i, prompt, 4, params, context_only) for i in range(count)]


@pytest.mark.parametrize(("num_blocks", "together"), [(13, 2), (18, 3), (100, 4), (4, 1)])
def test_jobs_run_as_many_at_once_as_the_cache_holds_uncompressed(num_blocks, together):
    engine = StubEngine(num_blocks, max_num_seqs=4)
    done: list[int] = []
    progress = SimpleNamespace(n=0)
    progress.update = lambda k: setattr(progress, "n", progress.n + k)
    run_jobs(engine, jobs(7), lambda job, out: done.append(job.key), progress)
    assert sorted(done) == list(range(7)) and progress.n == 7
    # Capped by the blocks (6 per job) and by max_num_seqs (4); a job that does not fit an
    # empty cache still runs, alone.
    assert max(engine.batch_sizes) == together


def test_question_is_a_suffix_only_when_the_context_is_compressed_first():
    for context_only, prompt, suffix in [
        (False, [0, 1, 2, 3, 4, 5, 7, 8], None),
        (True, [0, 1, 2, 3, 4, 5], [7, 8]),
    ]:
        engine = StubEngine(100)
        run_jobs(engine, jobs(1, context_only), lambda job, out: None)
        (request,) = engine.requests
        assert (request["prompt"], request["suffix"]) == (prompt, suffix)
        assert (request["sampling"].max_tokens, request["sampling"].temperature) == (4, 0.0)
        assert request["compression"].compression_rate == 4


def test_no_jobs_no_requests():
    engine = StubEngine(10)
    run_jobs(engine, [], lambda job, out: None)
    assert engine.requests == [] and engine.batch_sizes == []
