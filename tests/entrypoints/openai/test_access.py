"""Access and limits of the real server: API key, Host, docs and metrics exposure, the served
model name, the request body limit (uvicorn on loopback, default model, the openai client)."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
import torch

from kvcompress.engine import AsyncLLMEngine, EngineConfig, LLMEngine
from kvcompress.entrypoints.cli.main import build_parser
from kvcompress.entrypoints.cli.serve import allowed_hosts, server_options
from kvcompress.entrypoints.openai.app import DEFAULT_MODEL_NAME, build_app, model_name
from kvcompress.entrypoints.openai.options import LOOPBACK_HOSTS, ServerOptions
from kvcompress.entrypoints.openai.serving import BackgroundServer

pytestmark = pytest.mark.slow

KEY = "sk-test-key"
SERVED = "my-model"
LIMIT = 64 * 1024
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


@pytest.fixture(scope="module")
def guarded():
    engine = AsyncLLMEngine(LLMEngine(EngineConfig(kv_cache_memory="16MiB")))
    options = ServerOptions(
        api_key=KEY,
        max_request_bytes=LIMIT,
        docs="off",
        metrics="protected",
        allowed_hosts=(*LOOPBACK_HOSTS,),
    )
    app = build_app(engine, SERVED, options=options, aliases=(DEFAULT_MODEL_NAME,))
    srv = BackgroundServer(app).start()
    asyncio.run(engine.call(lambda _: torch.set_num_threads(1)))  # see test_server.py
    yield srv
    srv.stop()


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_error(resp: httpx.Response, status: int, code: str | None) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == code
    return error


# ---------------------------------------------------------------------- API key
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/models", None),
        ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}),
        ("POST", "/v1/chat/completions", CHAT),
        ("GET", "/v1/no-such-route", None),
    ],
)
@pytest.mark.parametrize("headers", [{}, auth("sk-wrong"), {"Authorization": KEY}], ids=str)
def test_every_v1_route_needs_the_key(guarded, method, path, body, headers):
    resp = httpx.request(method, f"{guarded.url}{path}", json=body, headers=headers)
    error = assert_error(resp, 401, "invalid_api_key")
    assert ("incorrect" in error["message"]) == ("sk-wrong" in str(headers))
    assert resp.headers["www-authenticate"] == "Bearer"


def test_the_right_key_through_the_openai_client(guarded):
    client = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key=KEY, max_retries=0)
    resp = client.completions.create(model=SERVED, prompt="Hello", max_tokens=2)
    assert resp.usage.completion_tokens == 2 and resp.model == SERVED
    wrong = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.models.list()
    assert info.value.code == "invalid_api_key"


def test_health_stays_open_metrics_behind_the_key_docs_off(guarded):
    assert httpx.get(f"{guarded.url}/health").json() == {"status": "ok"}
    assert_error(httpx.get(f"{guarded.url}/metrics"), 401, "invalid_api_key")
    assert "kvcompress_kv_blocks_free" in httpx.get(f"{guarded.url}/metrics", headers=auth()).text
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(f"{guarded.url}{path}", headers=auth()).status_code == 404


def test_protected_docs_and_metrics_off(guarded):
    # A second app over the same (running) engine: no model load.
    engine = guarded.server.config.app.state.engine
    options = ServerOptions(api_key=KEY, docs="protected", metrics="off")
    with BackgroundServer(build_app(engine, SERVED, manage_engine=False, options=options)) as srv:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert_error(httpx.get(f"{srv.url}{path}"), 401, "invalid_api_key")
            assert httpx.get(f"{srv.url}{path}", headers=auth()).status_code == 200
        assert httpx.get(f"{srv.url}/metrics", headers=auth()).status_code == 404


def test_unknown_host_is_refused(guarded):
    resp = httpx.get(f"{guarded.url}/health", headers={"Host": "attacker.example:8000"})
    assert_error(resp, 400, "invalid_host")
    assert httpx.get(f"{guarded.url}/health", headers={"Host": "localhost:1"}).status_code == 200


# ---------------------------------------------------------------------- model name
def test_served_name_and_own_name_are_accepted(guarded):
    client = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == [SERVED]
    for name in (SERVED, DEFAULT_MODEL_NAME):
        resp = client.chat.completions.create(model=name, **CHAT)
        assert resp.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=f"/models/{DEFAULT_MODEL_NAME}", prompt="x", max_tokens=1)


def test_model_name_is_never_a_path():
    assert model_name(None) == DEFAULT_MODEL_NAME
    assert model_name("/srv/models/Llama-3.2-1B-Instruct/") == "Llama-3.2-1B-Instruct"
    assert model_name("/srv/gguf/smollm2-135m-q8_0.gguf") == "smollm2-135m-q8_0"
    assert model_name("Qwen2-0.5B") == "Qwen2-0.5B"


# ---------------------------------------------------------------------- body limit
def test_content_length_over_the_limit_is_413(guarded):
    body = b'{"prompt": "' + b"a" * LIMIT + b'"}'
    resp = httpx.post(f"{guarded.url}/v1/completions", content=body, headers=auth())
    error = assert_error(resp, 413, "request_too_large")
    assert str(LIMIT) in error["message"]


def test_chunked_body_over_the_limit_is_413(guarded):
    def chunks():  # a generator: httpx sends it chunked, with no Content-Length
        yield b'{"prompt": "'
        for _ in range(8):
            yield b"a" * (LIMIT // 4)
        yield b'"}'

    resp = httpx.post(f"{guarded.url}/v1/completions", content=chunks(), headers=auth())
    assert "content-length" not in resp.request.headers
    assert_error(resp, 413, "request_too_large")


def test_body_under_the_limit_reaches_the_route(guarded):
    def chunks():
        yield b'{"prompt": "Hello", '
        yield b'"max_tokens": 1}'

    headers = auth() | {"content-type": "application/json"}
    resp = httpx.post(f"{guarded.url}/v1/completions", content=chunks(), headers=headers)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 1


# ---------------------------------------------------------------------- CLI
def parse_serve(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_api_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("KVCOMPRESS_API_KEY", "from-env")
    assert server_options(parse_serve()).api_key == "from-env"
    assert server_options(parse_serve("--api-key", "flag")).api_key == "flag"
    monkeypatch.delenv("KVCOMPRESS_API_KEY")
    options = server_options(parse_serve("--docs", "off", "--metrics", "public"))
    assert options.api_key is None and options.docs == "off" and options.metrics == "public"
    assert options.max_request_bytes == 8 * 2**20


def test_allowed_hosts_default_to_loopback_names_on_loopback():
    assert set(LOOPBACK_HOSTS) <= set(allowed_hosts(None, "127.0.0.1"))
    assert allowed_hosts(None, "0.0.0.0") is None
    assert allowed_hosts("api.example.com, 10.0.0.5:8000", "0.0.0.0") == (
        "api.example.com",
        "10.0.0.5",
    )
    assert allowed_hosts("*", "127.0.0.1") is None
