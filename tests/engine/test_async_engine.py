"""AsyncLLMEngine against a scripted fake engine: threading, errors, aborts (no model)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from kvcompress.engine import (
    AsyncLLMEngine,
    ChatPrompt,
    EngineStats,
    RequestOutput,
    RequestState,
    SamplingParams,
)
from kvcompress.errors import (
    ContextLengthError,
    EngineShutdownError,
    InvalidParameterError,
    QueueFullError,
    RequestFailedError,
    WorkerFailedError,
)


class FakeEngine:
    """One token ("x") per step for every request; optional failures and a queue bound."""

    def __init__(self, max_model_len: int = 100_000, max_queue: int | None = None) -> None:
        self.max_model_len = max_model_len
        self.max_queue = max_queue
        self.requests: dict[str, tuple[list[int], SamplingParams, list[int]]] = {}
        self.running: list[str] = []
        self.fail_next_step = False
        self.ranks_failed: str | None = None  # a tensor-parallel rank died
        self.closed = False
        self.threads: set[str] = set()  # threads that touched the engine's state
        self.tokenize_threads: set[str] = set()
        self.polls = 0
        self.step_delay = 0.0
        # A prompt starting with "slow" holds its tokenization until ``release`` is set.
        self.tokenizing = threading.Event()
        self.release = threading.Event()

    def _touch(self) -> None:
        self.threads.add(threading.current_thread().name)

    def tokenize(self, prompt: str) -> list[int]:
        self.tokenize_threads.add(threading.current_thread().name)
        if prompt.startswith("slow"):
            self.tokenizing.set()
            assert self.release.wait(30)
        return [1] * len(prompt.split())

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        self.tokenize_threads.add(threading.current_thread().name)
        return [2] * (3 + sum(len(m["content"].split()) for m in messages))

    def add_request(self, prompt, sampling, compression, request_id) -> str:
        self._touch()
        if not prompt:
            raise ValueError("the prompt is empty")
        waiting = len(self.requests)
        if self.max_queue is not None and waiting >= self.max_queue:
            raise QueueFullError(f"the queue is full ({self.max_queue} requests waiting)")
        self.requests[request_id] = (list(prompt), sampling, [])
        self.running.append(request_id)
        return request_id

    def abort_request(self, request_id: str) -> bool:
        self._touch()
        self.running = [r for r in self.running if r != request_id]
        return self.requests.pop(request_id, None) is not None

    def check_health(self) -> None:
        if self.ranks_failed:
            raise WorkerFailedError(self.ranks_failed)

    def close(self) -> None:
        self.closed = True

    def requests_in_flight(self) -> list[RequestState]:
        return [RequestState(r, "running", 1, 0) for r in self.running]

    def has_unfinished_requests(self) -> bool:
        self._touch()
        self.polls += 1
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        self._touch()
        time.sleep(self.step_delay)
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("boom")
        self.check_health()
        outputs = []
        for rid, (prompt, sampling, out) in list(self.requests.items()):
            out.append(7)
            done = len(out) >= sampling.max_tokens
            if done:
                self.abort_request(rid)
            outputs.append(
                RequestOutput(
                    rid,
                    "x" * len(out),
                    [7],
                    len(out),
                    len(prompt),
                    done,
                    "length" if done else None,
                    None,
                    list(out) if done else [],
                )
            )
        return outputs

    def stats(self) -> EngineStats:
        n = len(self.requests)
        return EngineStats(n, 0, 100, 100 - n, n, n, 16, 0, 0, 0, 0.0, 0, 0, 0, 0.0, 0.0)


@pytest.fixture
def fake():
    engine = FakeEngine()
    async_engine = AsyncLLMEngine(engine)
    async_engine.start()
    yield engine, async_engine
    async_engine.shutdown()


async def _collect(async_engine, prompt, max_tokens=3, **kw):
    return [
        o async for o in async_engine.generate(prompt, SamplingParams(max_tokens=max_tokens), **kw)
    ]


def test_generate_streams_every_token_from_the_engine_thread(fake):
    engine, async_engine = fake
    outs = asyncio.run(_collect(async_engine, "a b c", max_tokens=3))
    assert outs[-1].finished and outs[-1].finish_reason == "length"
    assert len(outs[-1].token_ids) == 3
    assert engine.threads == {"kvcompress-engine"}  # never touched from the caller's thread
    # Tokenization runs beside the engine thread, not in it (nor in the event loop).
    assert {t.rsplit("_", 1)[0] for t in engine.tokenize_threads} == {"kvcompress-tokenize"}


def test_streams_keep_going_while_a_prompt_is_tokenized(fake):
    engine, async_engine = fake
    engine.step_delay = 0.005

    async def main():
        running = await async_engine.add_request("a", SamplingParams(max_tokens=900))
        slow = asyncio.create_task(
            async_engine.add_request("slow " * 200_000, SamplingParams(max_tokens=2))
        )
        await asyncio.to_thread(engine.tokenizing.wait, 10)
        # The tokenization is held: had it run on the engine thread, no step would happen
        # and these outputs would never come.
        progress = [(await asyncio.wait_for(anext(running), 5)).num_output_tokens]
        while len(progress) < 5:
            progress.append((await asyncio.wait_for(anext(running), 5)).num_output_tokens)
        assert not slow.done()
        engine.release.set()
        # 200,000 tokens exceed the context: rejected before the engine (the fake has no
        # context check of its own).
        with pytest.raises(ContextLengthError, match="200000 tokens") as info:
            await slow
        assert info.value.param == "prompt"
        running.abort()
        return progress

    engine.max_model_len = 1000
    async_engine.max_model_len = 1000
    progress = asyncio.run(main())
    assert progress == sorted(progress) and progress[-1] > progress[0]


def test_text_that_cannot_be_encoded_is_rejected_by_name(fake):
    _, async_engine = fake
    with pytest.raises(InvalidParameterError, match="surrogate") as info:
        asyncio.run(_collect(async_engine, "abc \ud800 def"))
    assert info.value.param == "prompt"
    chat = ChatPrompt([{"role": "user", "content": "ok"}, {"role": "user", "content": "\udfff"}])
    with pytest.raises(InvalidParameterError, match="surrogate") as info:
        asyncio.run(_collect(async_engine, chat))
    assert info.value.param == "messages"


def test_concurrent_requests_share_steps(fake):
    _, async_engine = fake

    async def main():
        return await asyncio.gather(
            *(_collect(async_engine, "a b", max_tokens=4) for _ in range(20))
        )

    results = asyncio.run(main())
    assert all(r[-1].finished and len(r[-1].token_ids) == 4 for r in results)
    assert async_engine.finished_counts() == {"length": 20}


def test_add_errors_reach_the_caller_before_streaming(fake):
    _, async_engine = fake
    with pytest.raises(ValueError, match="empty"):
        asyncio.run(_collect(async_engine, []))
    with pytest.raises(ContextLengthError, match="context is 100000 tokens"):
        asyncio.run(_collect(async_engine, "a b c", max_tokens=99_998))


def test_fit_max_tokens_clamps_to_the_room_left():
    async_engine = AsyncLLMEngine(FakeEngine(max_model_len=64))
    async_engine.start()

    async def main():
        stream = await async_engine.add_request(
            ChatPrompt([{"role": "user", "content": "hi"}]),
            SamplingParams(max_tokens=1000),
            fit_max_tokens=True,
        )
        return [o async for o in stream]

    try:
        outs = asyncio.run(main())
    finally:
        async_engine.shutdown()
    assert len(outs[-1].token_ids) == 64 - 4  # a 4-token chat prompt leaves 60


def test_queue_full_propagates():
    engine = FakeEngine(max_queue=1)
    async_engine = AsyncLLMEngine(engine)
    async_engine.start()
    engine.step_delay = 0.05

    async def main():
        first = await async_engine.add_request("a", SamplingParams(max_tokens=50))
        with pytest.raises(QueueFullError):
            await async_engine.add_request("b", SamplingParams(max_tokens=5))
        first.abort()

    try:
        asyncio.run(main())
    finally:
        async_engine.shutdown()


def test_cancelled_consumer_aborts_its_request(fake):
    engine, async_engine = fake
    engine.step_delay = 0.01

    async def main():
        async def consume():
            async for _ in async_engine.generate("a", SamplingParams(max_tokens=10_000)):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.2)
        assert engine.requests
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if not engine.requests:
                break
            await asyncio.sleep(0.02)

    asyncio.run(main())
    assert not engine.requests
    assert async_engine.finished_counts().get("abort") == 1


def test_step_failure_fails_running_requests_and_keeps_serving(fake):
    engine, async_engine = fake
    engine.step_delay = 0.01

    async def main():
        stream = await async_engine.add_request("a", SamplingParams(max_tokens=10_000))
        engine.fail_next_step = True
        with pytest.raises(RequestFailedError, match="boom"):
            async for _ in stream:
                pass
        assert not engine.requests  # its resources were released
        return await _collect(async_engine, "b", max_tokens=2)

    outs = asyncio.run(main())
    assert outs[-1].finished
    assert async_engine.step_errors == 1
    assert async_engine.finished_counts()["error"] == 1


def test_a_dead_rank_fails_every_request_and_stops_the_engine(fake):
    engine, async_engine = fake
    engine.step_delay = 0.01

    async def main():
        stream = await async_engine.add_request("a", SamplingParams(max_tokens=10_000))
        assert async_engine.failure is None
        engine.ranks_failed = "rank 1 died"
        with pytest.raises(WorkerFailedError, match="rank 1 died"):
            async for _ in stream:
                pass

    asyncio.run(main())
    assert async_engine.failure == "rank 1 died"  # what /health reports, then the server exits
    deadline = time.monotonic() + 10
    while async_engine.is_running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not async_engine.is_running and engine.closed  # no busy loop of failing steps


def test_idle_loop_sleeps(fake):
    engine, async_engine = fake
    asyncio.run(_collect(async_engine, "a", max_tokens=2))
    polls = engine.polls
    time.sleep(0.5)
    assert engine.polls - polls <= 2  # no busy spinning while there is nothing to do


def test_shutdown_aborts_in_flight_and_refuses_new(fake):
    engine, async_engine = fake
    engine.step_delay = 0.01

    async def main():
        stream = await async_engine.add_request("a", SamplingParams(max_tokens=10_000))
        await asyncio.to_thread(async_engine.shutdown)
        with pytest.raises(EngineShutdownError):
            async for _ in stream:
                pass
        with pytest.raises(EngineShutdownError):
            await async_engine.add_request("b", SamplingParams(max_tokens=2))

    asyncio.run(main())
    assert not engine.requests
    assert not async_engine.is_running


def test_call_runs_in_the_engine_thread(fake):
    _, async_engine = fake
    name = asyncio.run(async_engine.call(lambda e: threading.current_thread().name))
    assert name == "kvcompress-engine"
