"""The job driver on a stand-in engine: admission under the KV budget, the drive loop, how
a prompt's question reaches the engine, and which jobs share one prefill."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kvcompress.compress import CompressionParams
from kvcompress.engine import Capacity
from kvcompress.eval.jobs import Job, plan_submissions, run_jobs
from kvcompress.eval.prompts import PromptIds


class StubEngine:
    """Takes `steps` steps per request and records how many ran together at each step.

    Only the public API that `run_jobs` may use: `capacity`, `add_request`,
    `add_branched_request` and `run`.
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

    def add_branched_request(self, prompt, sampling, branches, suffix=None) -> list[str]:
        ids = [self.add_request(prompt, sampling, b, suffix) for b in branches]
        self.requests[-len(ids)]["branches"] = len(ids)
        return ids

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
    run_jobs(engine, jobs(7), lambda job, out: done.append(job.key), progress, False)
    assert sorted(done) == list(range(7)) and progress.n == 7
    # Capped by the blocks (6 per job) and by max_num_seqs (4); a job that does not fit an
    # empty cache still runs, alone.
    assert max(engine.batch_sizes) == together


@pytest.mark.parametrize("shared", [True, False])
def test_question_is_a_suffix_only_when_the_context_is_compressed_first(shared):
    for context_only, prompt, suffix in [
        (False, [0, 1, 2, 3, 4, 5, 7, 8], None),
        (True, [0, 1, 2, 3, 4, 5], [7, 8]),
    ]:
        engine = StubEngine(100)
        run_jobs(engine, jobs(1, context_only), lambda job, out: None, shared_prefill=shared)
        (request,) = engine.requests
        assert (request["prompt"], request["suffix"]) == (prompt, suffix)
        assert (request["sampling"].max_tokens, request["sampling"].temperature) == (4, 0.0)
        assert request["compression"].compression_rate == 4


def test_no_jobs_no_requests():
    engine = StubEngine(10)
    run_jobs(engine, [], lambda job, out: None)
    assert engine.requests == [] and engine.batch_sizes == []


def grid_job(key, policy: str, rate: float, prompt=(0, 1, 2), budget: int = 4) -> Job:
    params = CompressionParams(policy=policy, compression_rate=rate, min_cache_tokens=0)
    return Job(key, PromptIds(list(prompt), [9]), budget, params, False)


def test_a_prompts_evicting_jobs_share_one_prefill_per_metric():
    grid = [
        grid_job("full", "full", 1),
        grid_job("s8", "streaming", 8),  # reads no metric: joins the first group
        grid_job("k4", "kvcompress", 4),
        grid_job("h4", "h2o", 4),  # the L1 metric: a prefill of its own
        grid_job("u8", "uniform", 8),
        grid_job("r1", "random", 1),  # rate 1 evicts nothing: its own request
        grid_job("other", "kvcompress", 4, prompt=(5, 6)),
        grid_job("longer", "kvcompress", 8, budget=8),
    ]
    plan = plan_submissions(grid, True, max_branches=8)
    assert [([j.key for j in s.jobs], s.branched) for s in plan] == [
        (["full"], False),
        (["s8", "k4", "u8"], True),
        (["h4"], True),
        (["r1"], False),
        (["other"], True),
        (["longer"], True),
    ]
    assert [len(s.jobs) for s in plan_submissions(grid, True, max_branches=2)] == [
        1, 2, 1, 1, 1, 1, 1
    ]  # fmt: skip
    assert all(len(s.jobs) == 1 and not s.branched for s in plan_submissions(grid, False, 8))


def test_shared_prefill_routes_every_output_to_its_job_and_reserves_per_group():
    grid = [grid_job(f"{p}{r}", p, r) for p in ("kvcompress", "uniform", "h2o") for r in (4, 8)]
    grid += [grid_job("full", "full", 1)]
    engine = StubEngine(100)
    done = {}
    run_jobs(engine, grid, lambda job, out: done.setdefault(out.request_id, job.key))
    assert sorted(done.values()) == sorted(j.key for j in grid)
    branched = [r.get("branches") for r in engine.requests if "branches" in r]
    assert branched == [4, 2]  # kvcompress and uniform at both rates; h2o at both
    assert [r["compression"].policy for r in engine.requests] == [
        "kvcompress", "kvcompress", "uniform", "uniform", "h2o", "h2o", "full"
    ]  # fmt: skip
    # 3 + 1 prompt tokens, 4 generated, blocks of 4 in 2 heads: a branched group holds the
    # prompt uncompressed plus each branch's compressed copy, or the copies and their
    # growth; in a cache of 20 blocks only one group at a time.
    engine = StubEngine(20)
    run_jobs(engine, grid, lambda job, out: None)
    assert max(engine.batch_sizes) == 4
