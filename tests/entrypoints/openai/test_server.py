"""The real server (uvicorn on loopback, default model, small KV budget) via the openai client."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from kvcompress.bench.load import LoadConfig, drive
from kvcompress.engine import AsyncLLMEngine, EngineConfig, LLMEngine
from kvcompress.entrypoints.openai.app import DEFAULT_MODEL_NAME, build_app
from kvcompress.entrypoints.openai.protocol import COMPRESSION_FIELDS
from kvcompress.entrypoints.openai.serving import BackgroundServer, free_port

pytestmark = pytest.mark.slow

MODEL = DEFAULT_MODEL_NAME
# 16 MiB holds 2016 blocks: 22 tokens' worth of blocks in each of the 90 (layer, KV head)
# pairs, i.e. 352 tokens in all, so only a handful of short requests run at once.
KV_BUDGET = "16MiB"
WORDS = [
    *("the", "river", "keeps", "its", "old", "course", "through", "the", "valley", "while"),
    *("lanterns", "on", "the", "bridge", "glow", "softly", "and", "travelers", "count"),
    *("the", "stones", "of", "the", "road", "under", "a", "slow", "autumn", "moon"),
]


def start_server(**config) -> BackgroundServer:
    engine = AsyncLLMEngine(LLMEngine(EngineConfig(kv_cache_memory=KV_BUDGET, **config)))
    srv = BackgroundServer(build_app(engine, MODEL)).start()
    # On a shared 2-core machine torch's OpenMP threads spin-wait on each other whenever
    # another thread (uvicorn, the clients) holds a core; one engine thread is faster here.
    # The setting is per thread in OpenMP, so it is made in the engine thread itself.
    asyncio.run(engine.call(lambda _: torch.set_num_threads(1)))
    return srv


@pytest.fixture(scope="module")
def server():
    srv = start_server(max_num_seqs=64)
    yield srv
    srv.stop()
    assert not srv.thread.is_alive()
    assert not srv.server.config.app.state.engine.is_running  # lifespan stopped the engine


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def metrics(url: str) -> dict[str, float]:
    """Samples of /metrics as {name or name{label=value}: value}."""
    text = httpx.get(f"{url}/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = {k: v for k, v in s.labels.items() if k != "model"}
            key = s.name + (
                "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"
                if labels
                else ""
            )
            out[key] = s.value
    return out


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def wait_all_blocks_free(url: str, timeout: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        idle = m["kvcompress_requests_running"] == 0 and m["kvcompress_requests_waiting"] == 0
        if idle and m["kvcompress_kv_blocks_free"] == m["kvcompress_kv_blocks_total"]:
            assert m["kvcompress_kv_blocks_held"] == m["kvcompress_kv_blocks_leaked"] == 0
            return m
        assert time.monotonic() < deadline, f"blocks still held: {m}"
        time.sleep(0.1)


def text_of(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


# ---------------------------------------------------------------------- happy paths
def test_health_and_models(server, client):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion(client):
    resp = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0
    )
    choice = resp.choices[0]
    assert choice.text and choice.finish_reason == "length"
    assert resp.usage.completion_tokens == 6
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 6
    kv = resp.model_dump()["kv"]
    assert kv["kvs_seen"] == kv["kvs_kept"] > 0  # the server default: no compression
    assert len(kv["kept_per_layer_head"]) == 30


def test_chat(client):
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12,
        temperature=0,
    )
    msg = resp.choices[0].message
    assert msg.role == "assistant" and "Paris" in msg.content
    assert resp.usage.prompt_tokens > 5
    assert resp.model_dump()["kv"]["blocks"] > 0


def test_completion_stream_matches_non_stream(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0)
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(
        client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert finals[0].model_dump()["kv"]["kvs_kept"] > 0
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_chat_stream(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Name a color."}],
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].model_dump()["kv"]["kvs_seen"] > 0
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk


def test_compression_fields_reach_the_engine(client):
    prompt = text_of(280, seed=1)
    resp = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=2,
        temperature=0,
        extra_body={"compression_rate": 4, "protected_window": 16},
    )
    assert 250 <= resp.usage.prompt_tokens <= 340
    kv = resp.model_dump()["kv"]
    assert kv["compressions"] >= 1
    assert kv["kvs_seen"] / kv["kvs_kept"] > 2
    # Without the fields the server default (no compression) applies.
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert plain.model_dump()["kv"]["kvs_seen"] == plain.model_dump()["kv"]["kvs_kept"]


def test_last_query_scorer_and_metric_settings_through_the_server(server, client):
    """scorer=last-query (TOVA) and a request's own pool_kernel run end to end: real blocks
    are freed by the compressions and all return to the pool afterwards."""
    for fields in (
        {"scorer": "last-query", "compression_interval": 1},
        {"pool_kernel": 21, "window_size": 16, "collection_buffer": 1},
    ):
        resp = client.completions.create(
            model=MODEL,
            prompt=text_of(280, seed=3),
            max_tokens=3,
            temperature=0,
            extra_body={"max_cache_tokens": 64, "protected_window": 8, **fields},
        )
        kv = resp.model_dump()["kv"]
        assert kv["compressions"] >= 1
        assert kv["kvs_kept"] < kv["kvs_seen"] / 2
    wait_all_blocks_free(server.url)


def test_compression_fields_in_streamed_chat(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": text_of(250, seed=2)}],
            max_tokens=3,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"max_cache_tokens": 64, "protected_window": 8, "compress_once": True},
        )
    )
    kv = chunks[-1].model_dump()["kv"]
    assert kv["compressions"] == 1
    assert kv["kvs_kept"] < kv["kvs_seen"] / 2
    assert chunks[-1].usage.completion_tokens == 3


# ---------------------------------------------------------------------- bad input
LONG_FOR_KV = " ".join(["word"] * 600)  # fits the context, not the 352-token KV budget
LONG_FOR_CONTEXT = " ".join(["word"] * 9000)  # beyond the 8192-token context

BAD_REQUESTS = [
    # (path, body, status, param, words in the message)
    ("completions", {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens", "valid integer"),
    ("completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens", "greater than"),
    ("completions", {"prompt": "hi", "max_tokens": 10**9}, 400, "max_tokens", "context"),
    ("completions", {"prompt": "hi", "temperature": 2.5}, 400, "temperature", "less than"),
    ("completions", {"prompt": "hi", "temperature": -0.1}, 400, "temperature", "greater"),
    ("completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature", "number"),
    ("completions", {"prompt": ""}, 400, "prompt", "empty"),
    ("completions", {"prompt": []}, 400, "prompt", "empty"),
    ("completions", {"prompt": 42}, 400, "prompt", "string"),
    ("completions", {"max_tokens": 4}, 400, "prompt", "required"),
    ("completions", {"prompt": "hi", "stream": "yes"}, 400, "stream", "boolean"),
    ("completions", {"prompt": "hi", "stop": 3}, 400, "stop", "valid string"),
    ("completions", {"prompt": LONG_FOR_CONTEXT}, 400, "prompt", "context"),
    ("completions", {"prompt": LONG_FOR_KV, "max_tokens": 1}, 400, "prompt", "KV cache"),
    ("completions", {"prompt": "hi", "model": "gpt-4o"}, 404, "model", "does not exist"),
    ("completions", {"prompt": "hi", "compression_rate": 0.5}, 400, "compression_rate", ">= 1"),
    ("completions", {"prompt": "hi", "compression_rate": "x"}, 400, "compression_rate", "number"),
    ("completions", {"prompt": "hi", "policy": "magic"}, 400, "policy", "unknown policy"),
    ("completions", {"prompt": "hi", "protected_window": -2}, 400, "protected_window", ">= 0"),
    ("completions", {"prompt": "hi", "max_cache_tokens": 0}, 400, "max_cache_tokens", ">= 1"),
    (
        "completions",
        {"prompt": "hi", "compression_rate": 2, "max_cache_tokens": 8},
        400,
        "compression_rate",
        "not both",
    ),
    ("completions", {"prompt": "hi", "compress_once": "no"}, 400, "compress_once", "boolean"),
    ("completions", {"prompt": "hi", "pool_kernel": 4}, 400, "pool_kernel", "odd"),
    ("completions", {"prompt": "hi", "pool_kernel": "x"}, 400, "pool_kernel", "integer"),
    ("completions", {"prompt": "hi", "window_size": 0}, 400, "window_size", ">= 1"),
    ("completions", {"prompt": "hi", "collection_buffer": -1}, 400, "collection_buffer", ">= 0"),
    ("completions", {"prompt": "hi", "layer_floor": 1.5}, 400, "layer_floor", "from 0 to 1"),
    ("completions", {"prompt": "hi", "policy": None}, 400, "policy", "cannot be null"),
    ("completions", {"prompt": "hi", "top_p": 0.0}, 400, "top_p", "greater than"),
    ("completions", {"prompt": "hi", "n": 17}, 400, "n", "at most 16"),
    # Numbers beyond 64 bits are named, not an overflow deep in torch.
    ("completions", {"prompt": "hi", "seed": 2**64}, 400, "seed", "less than"),
    ("completions", {"prompt": "hi", "seed": -(2**63) - 1}, 400, "seed", "greater than"),
    ("completions", {"prompt": "hi", "max_tokens": 2**63}, 400, "max_tokens", "less than"),
    ("completions", {"prompt": "hi", "top_k": 2**63}, 400, "top_k", "less than"),
    ("completions", {"prompt": "hi", "n": 2**70}, 400, "n", "less than"),
    ("completions", {"prompt": "hi", "stop_token_ids": [2**64]}, 400, "stop_token_ids.0", "less"),
    ("completions", {"prompt": "hi", "protected_window": 10**30}, 400, "protected_window", "less"),
    ("completions", {"prompt": "hi", "sinks": 2**63}, 400, "sinks", "less than"),
    ("completions", {"prompt": "hi", "max_cache_tokens": 2**64}, 400, "max_cache_tokens", "less"),
    # Lone UTF-16 surrogates cannot be tokenized: a 400 that says so, not a 500.
    ("completions", {"prompt": "abc \ud800 def"}, 400, "prompt", "surrogate"),
    ("completions", {"prompt": ["\udfff"]}, 400, "prompt", "surrogate"),
    ("chat/completions", {"messages": []}, 400, "messages", "at least 1"),
    ("chat/completions", {"messages": "hi"}, 400, "messages", "valid list"),
    (
        "chat/completions",
        {"messages": [{"role": "bot", "content": "x"}]},
        400,
        "messages.0.role",
        "user",
    ),
    ("chat/completions", {"messages": [{"role": "user", "content": ""}]}, 400, "messages", "empty"),
    (
        "chat/completions",
        {"messages": [{"role": "user", "content": "abc \ud800 def"}]},
        400,
        "messages",
        "surrogate",
    ),
    (
        "chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "model": "nope"},
        404,
        "model",
        "does not exist",
    ),
    (
        "chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 10**7},
        400,
        "max_tokens",
        "context",
    ),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "words"), BAD_REQUESTS)
def test_bad_request(server, path, body, status, param, words):
    # json.dumps escapes lone surrogates ("\\ud800"), as a client in any language may send.
    raw = json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    resp = httpx.post(f"{server.url}/v1/{path}", content=raw, headers=headers, timeout=60)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert words in error["message"]
    if status == 404:
        assert error["code"] == "model_not_found"
    # Codes come from the engine's typed errors, never from reading messages.
    codes = {"context": "context_length_exceeded", "KV cache": "kv_cache_exceeded"}
    if words in codes:
        assert error["code"] == codes[words]
    if param in COMPRESSION_FIELDS and words in {">= 1", ">= 0", "not both", "unknown policy"}:
        assert error["code"] == "invalid_parameter"


@pytest.mark.parametrize(
    "raw", [b"{not json", b"", b"[1, 2]", b'{"prompt": "hi",}', b"\xff\xfe"], ids=str
)
def test_malformed_body(server, raw):
    resp = httpx.post(
        f"{server.url}/v1/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_errors_through_the_openai_client(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="hi", temperature=3)
    with pytest.raises(openai.NotFoundError, match="does not exist") as info:
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="policy"):
        client.completions.create(model=MODEL, prompt="hi", extra_body={"policy": "nope"})


def test_seed_at_the_top_of_its_range_is_served(client):
    resp = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=2, temperature=1.0, seed=2**64 - 1
    )
    assert resp.usage.completion_tokens == 2


def test_streams_keep_going_while_a_huge_prompt_is_rejected(server):
    """A 2 MB prompt takes seconds to tokenize; that must not stop the running streams."""
    huge = " ".join(["word"] * 400_000)
    body = {"prompt": "Tell me a long story.", "max_tokens": 300, "ignore_eos": True}
    events = 0
    seen: dict[str, int] = {}

    def reject() -> None:
        seen["sent"] = events
        resp = httpx.post(f"{server.url}/v1/completions", json={"prompt": huge}, timeout=120)
        seen["answered"] = events
        seen["status"] = resp.status_code
        seen["code"] = resp.json()["error"]["code"]

    rejecter = threading.Thread(target=reject)
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json=body | {"stream": True}, timeout=120
    ) as resp:
        for line in resp.iter_lines():
            events += line.startswith("data:")
            if events == 2 and not rejecter.is_alive() and "sent" not in seen:
                rejecter.start()
            if "answered" in seen:
                break
    rejecter.join()
    assert seen["status"] == 400 and seen["code"] == "context_length_exceeded"
    # Tokens kept arriving while the huge prompt was tokenized and rejected (on the engine
    # thread, the stream stalled until the 400 was out).
    assert seen["answered"] - seen["sent"] >= 3, seen
    wait_all_blocks_free(server.url)


def test_server_still_serves_after_bad_input(server, client):
    resp = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
    assert resp.usage.completion_tokens == 2
    wait_all_blocks_free(server.url)


# ---------------------------------------------------------------------- load and aborts
def test_100_concurrent_requests_all_finish(server):
    rng = random.Random(0)
    jobs = [
        (
            # Chat prompts carry the template's ~30-token system prompt: fewer of those.
            rng.choice(["completion", "completion", "chat"]),
            text_of(rng.randint(1, 30), seed=i),
            rng.randint(4, 16),
        )
        for i in range(100)
    ]
    peak = {"waiting": 0.0, "running": 0.0}
    stop = threading.Event()

    def watch() -> None:  # the budget must force queueing, or the test proves little
        while not stop.is_set():
            m = metrics(server.url)
            peak["waiting"] = max(peak["waiting"], m["kvcompress_requests_waiting"])
            peak["running"] = max(peak["running"], m["kvcompress_requests_running"])
            time.sleep(0.2)

    async def one(aclient: openai.AsyncOpenAI, kind: str, prompt: str, max_tokens: int, i: int):
        stream = i % 3 == 0
        if kind == "completion":
            call = aclient.completions.create(
                model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0.7, seed=i,
                stream=stream, stream_options={"include_usage": True} if stream else None,
            )  # fmt: skip
        else:
            call = aclient.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": prompt}],
                max_tokens=max_tokens, temperature=0.7, seed=i,
                stream=stream, stream_options={"include_usage": True} if stream else None,
            )  # fmt: skip
        resp = await call
        if stream:
            chunks = [c async for c in resp]
            return chunks[-1].usage.completion_tokens, max_tokens
        assert resp.choices[0].finish_reason in ("stop", "length")
        return resp.usage.completion_tokens, max_tokens

    async def main():
        aclient = openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300
        )
        async with aclient:
            return await asyncio.gather(
                *(one(aclient, kind, p, m, i) for i, (kind, p, m) in enumerate(jobs))
            )

    watcher = threading.Thread(target=watch, daemon=True)
    before = metrics(server.url)
    watcher.start()
    try:
        results = asyncio.run(main())
    finally:
        stop.set()
        watcher.join()
    assert len(results) == 100
    assert all(1 <= got <= want for got, want in results)
    m = wait_all_blocks_free(server.url)
    assert peak["waiting"] > 0 and peak["running"] > 1  # batched, and queued beyond the budget

    def done(reason: str) -> float:
        key = f"kvcompress_requests_total{{reason={reason}}}"
        return m[key] - before[key]

    assert done("stop") + done("length") == 100
    assert done("error") == 0


def test_stream_disconnect_frees_blocks(server):
    before = metrics(server.url)["kvcompress_requests_total{reason=abort}"]
    body = {"prompt": "Tell me a long story.", "max_tokens": 300, "ignore_eos": True}
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", f"{server.url}/v1/completions", json=body | {"stream": True}) as resp,
    ):
        events = 0
        for line in resp.iter_lines():
            events += line.startswith("data:")
            if events == 2:
                assert metrics(server.url)["kvcompress_requests_running"] == 1
            if events == 3:
                break  # closes the connection after 3 of 300 tokens
    start = time.monotonic()
    m = wait_all_blocks_free(server.url, timeout=10)
    assert time.monotonic() - start < 10
    assert m["kvcompress_requests_total{reason=abort}"] == before + 1


def test_non_stream_disconnect_frees_blocks(server):
    before = metrics(server.url)["kvcompress_requests_total{reason=abort}"]
    body = {"prompt": "Tell me a long story.", "max_tokens": 300, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=1.5)
    m = wait_all_blocks_free(server.url, timeout=10)
    assert m["kvcompress_requests_total{reason=abort}"] == before + 1


def test_bounded_queue_answers_429():
    srv = start_server(max_num_seqs=1, max_queue=1)
    long_body = {"prompt": "Count to a thousand.", "max_tokens": 300, "ignore_eos": True}
    try:
        with httpx.Client(timeout=60) as http:
            url = f"{srv.url}/v1/completions"
            running = http.send(
                http.build_request("POST", url, json=long_body | {"stream": True}), stream=True
            )
            # Keep the line iterator referenced: when it is collected, httpx closes the
            # connection and the server aborts the request.
            running_lines = running.iter_lines()
            next(line for line in running_lines if line.startswith("data:"))
            # Headers come back once the engine has queued the request.
            waiting = http.send(
                http.build_request("POST", url, json=long_body | {"stream": True}), stream=True
            )
            assert waiting.status_code == 200
            wait_for(lambda: metrics(srv.url)["kvcompress_requests_waiting"] == 1)
            client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
            with pytest.raises(openai.RateLimitError, match="queue is full") as info:
                client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
            assert info.value.response.json()["error"]["code"] == "queue_full"
            running.close()
            waiting.close()
            wait_all_blocks_free(srv.url, timeout=20)
            # Once the queue has room again, requests are accepted.
            assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage
    finally:
        srv.stop()


def test_serve_command_ends_open_streams_and_exits_on_sigint():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["serve", "--port", str(port), "--kv-cache-memory", KV_BUDGET]
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvcompress.entrypoints.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def up() -> bool:
            assert proc.poll() is None, proc.stdout.read()
            try:
                return httpx.get(f"{url}/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout=120)
        body = {"prompt": "Story:", "max_tokens": 300, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as resp:
            lines = resp.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            proc.send_signal(signal.SIGINT)
            events = [line for line in lines if line.startswith("data:")]
        # The stream outlived the grace period: it ends with an error event, not a cut.
        assert events[-1] == "data: [DONE]"
        assert "shutting down" in events[-2]
        assert proc.wait(timeout=60) == 0
        assert "Application shutdown complete" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_load_clients_against_the_server(server):
    cfg = LoadConfig(clients=2, duration=1.0, prompt_len=16, max_tokens=3, grace=30)
    prompts = [[1000 + i] * cfg.prompt_len for i in range(4)]
    run = asyncio.run(drive(server.url, prompts, cfg))
    assert run.records and all(r.error is None for r in run.records)
    assert all(r.tokens == 3 and r.first is not None and len(r.gaps) == 2 for r in run.records)
    assert run.elapsed >= 1.0 and run.probes == []
