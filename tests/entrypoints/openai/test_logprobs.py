"""logprobs, echo and prompt scoring through the real server and the openai client, checked
against transformers' log-softmax on the same weights (compression off, prefill in chunks of
8 tokens so that every prompt here spans several)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from tests.entrypoints.openai.test_server import MODEL, start_server

pytestmark = pytest.mark.slow

TEXT = (
    "The river keeps its old course through the valley while lanterns on the bridge glow "
    "softly and travelers count the stones of the road"
)
ATOL = 1e-4


@pytest.fixture(scope="module")
def server():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the transformers references run here; see start_server
    srv = start_server(max_num_seqs=8, prefill_chunk_size=8)
    yield srv
    srv.stop()
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def llm(server):
    """The server's own LLMEngine (tokenizer, chat template, transformers twin)."""
    return server.server.config.app.state.engine.engine


@pytest.fixture(scope="module")
def hf(llm):
    return llm.to_transformers()


def log_softmax(hf, ids: list[int]) -> torch.Tensor:
    """transformers' log-probabilities of the next token after each position of ``ids``."""
    with torch.inference_mode():
        return hf(torch.tensor([ids])).logits[0].float().log_softmax(dim=-1)


def greedy(hf, ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy continuation and the log-probabilities each token was drawn from."""
    out = list(ids)
    for _ in range(n):
        out.append(int(log_softmax(hf, out)[-1].argmax()))
    return out[len(ids) :], log_softmax(hf, out)[len(ids) - 1 : -1]


def text(llm, token_id: int) -> str:
    return llm.tokenizer.decode([token_id])


def test_completion_logprobs_match_transformers(client, llm, hf):
    ids = llm.tokenize(TEXT)
    resp = client.completions.create(
        model=MODEL, prompt=TEXT, max_tokens=5, temperature=0, logprobs=3
    )
    choice = resp.choices[0]
    lp = choice.logprobs
    gen, ref = greedy(hf, ids, 5)
    assert lp.tokens == [text(llm, t) for t in gen]
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for i, token in enumerate(gen):
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i, token]), abs=ATOL)
        values, top_ids = ref[i].topk(3)
        expected = {text(llm, t): float(v) for t, v in zip(top_ids.tolist(), values, strict=True)}
        assert lp.top_logprobs[i] == pytest.approx(expected, abs=ATOL)


def test_echo_returns_the_prompt_with_its_logprobs_first(client, llm, hf):
    ids = llm.tokenize(TEXT)
    resp = client.completions.create(
        model=MODEL, prompt=ids, max_tokens=2, temperature=0, logprobs=2, echo=True
    )
    choice = resp.choices[0]
    lp = choice.logprobs
    gen, _ = greedy(hf, ids, 2)
    assert choice.text.startswith(TEXT) and len(choice.text) > len(TEXT)
    assert lp.tokens == [text(llm, t) for t in ids + gen]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = log_softmax(hf, ids + gen)
    for i in range(1, len(ids) + 2):
        token = (ids + gen)[i]
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i - 1, token]), abs=ATOL)
        # The chosen token is always among the alternatives, as OpenAI lists them.
        assert lp.top_logprobs[i][text(llm, token)] == pytest.approx(lp.token_logprobs[i])
        assert 2 <= len(lp.top_logprobs[i]) <= 3
    assert lp.text_offset[len(ids)] == len(TEXT)


def test_echo_without_logprobs_puts_the_prompt_before_the_completion(client):
    plain = client.completions.create(model=MODEL, prompt=TEXT, max_tokens=3, temperature=0)
    echoed = client.completions.create(
        model=MODEL, prompt=TEXT, max_tokens=3, temperature=0, echo=True
    )
    assert echoed.choices[0].text == TEXT + plain.choices[0].text
    assert echoed.choices[0].logprobs is None


@pytest.mark.parametrize("as_ids", [True, False], ids=["token-ids", "text"])
@pytest.mark.parametrize("max_tokens", [0, 1])
def test_lm_eval_loglikelihood_call(client, llm, hf, as_ids, max_tokens):
    """lm-evaluation-harness' local-completions loglikelihood request: score the prompt."""
    ids = llm.tokenize(TEXT)
    resp = client.completions.create(
        model=MODEL,
        prompt=ids if as_ids else TEXT,
        echo=True,
        logprobs=1,
        max_tokens=max_tokens,
        temperature=0,
        seed=1234,
    )
    choice = resp.choices[0]
    lp = choice.logprobs
    assert len(lp.token_logprobs) == len(ids) + max_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = log_softmax(hf, ids)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i - 1, ids[i]]), abs=ATOL)
        # lm-eval's greedy check: the token's logprob against the best alternative's.
        greedy_here = ids[i] == int(ref[i - 1].argmax())
        assert (lp.token_logprobs[i] == max(lp.top_logprobs[i].values())) == greedy_here
    assert resp.usage.prompt_tokens == len(ids)
    assert resp.usage.completion_tokens == max_tokens
    assert choice.finish_reason == "length"
    if max_tokens == 0:
        assert choice.text == TEXT


def test_lm_eval_sends_a_batch_of_one_token_list(server, llm):
    """Its raw payload: ``prompt`` is a list of token-id lists (a batch of one here)."""
    ids = llm.tokenize(TEXT)[:10]
    body = {"prompt": [ids], "echo": True, "logprobs": 1, "max_tokens": 0, "temperature": 0}
    resp = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["choices"][0]["logprobs"]["token_logprobs"]) == 10
    body["prompt"] = [ids, ids]
    resp = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt"


def test_streamed_completion_logprobs_match_the_whole_response(client):
    kwargs = dict(model=MODEL, prompt=TEXT[:40], max_tokens=6, temperature=0, logprobs=2, echo=True)
    whole = client.completions.create(**kwargs).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**kwargs, stream=True)]
    assert chunks[0].text.startswith(TEXT[:40])  # the echoed prompt comes first
    assert "".join(c.text for c in chunks) == whole.text
    parts = [c.logprobs for c in chunks if c.logprobs is not None]
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for part in parts for x in getattr(part, field)] == getattr(whole.logprobs, field)


def test_chat_logprobs_match_transformers(client, llm, hf):
    messages = [{"role": "user", "content": "Name a color."}]
    resp = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    choice = resp.choices[0]
    content = choice.logprobs.content
    gen, ref = greedy(hf, llm.apply_chat_template(messages), len(content))
    assert [c.token for c in content] == [text(llm, t) for t in gen]
    assert "".join(c.token for c in content) == choice.message.content
    for c, row, token in zip(content, ref, gen, strict=True):
        assert c.logprob == pytest.approx(float(row[token]), abs=ATOL)
        assert c.bytes == list(c.token.encode())
        values, top_ids = row.topk(2)
        assert [t.token for t in c.top_logprobs] == [text(llm, t) for t in top_ids.tolist()]
        assert [t.logprob for t in c.top_logprobs] == pytest.approx(values.tolist(), abs=ATOL)
        assert all(t.bytes == list(t.token.encode()) for t in c.top_logprobs)

    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True, stream=True
    )
    streamed = [
        t
        for c in stream
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content
    ]
    assert [(t.token, t.logprob) for t in streamed] == [(c.token, c.logprob) for c in content]
    assert all(t.top_logprobs == [] for t in streamed)  # top_logprobs left out: 0


def test_without_logprobs_there_are_none(client):
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert resp.choices[0].logprobs is None
    resp = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert resp.choices[0].logprobs is None


CHAT = {"messages": [{"role": "user", "content": "x"}]}
BAD = [
    ("completions", {"prompt": "hi", "logprobs": 21}, "logprobs", "less than or equal to 20"),
    ("completions", {"prompt": "hi", "logprobs": -1}, "logprobs", "greater than"),
    ("completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens", "echo=true and logprobs"),
    ("completions", {"prompt": "hi", "max_tokens": 0, "echo": True}, "max_tokens", "logprobs"),
    ("completions", {"prompt": "hi", "max_tokens": 0, "logprobs": 1}, "max_tokens", "echo"),
    ("completions", {"prompt": "hi", "n": 2, "best_of": 1}, "best_of", "[n, 16]"),
    ("completions", {"prompt": "hi", "best_of": 3, "stream": True}, "best_of", "streamed"),
    ("chat/completions", CHAT | {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "20"),
    ("chat/completions", CHAT | {"top_logprobs": 2}, "top_logprobs", "logprobs=true"),
    ("chat/completions", CHAT | {"logprobs": 1}, "logprobs", "boolean"),
    ("chat/completions", CHAT | {"max_tokens": 0}, "max_tokens", "greater than"),
]


@pytest.mark.parametrize(("path", "body", "param", "words"), BAD)
def test_bad_logprob_requests(server, path, body, param, words):
    resp = httpx.post(
        f"{server.url}/v1/{path}", content=json.dumps(body).encode(), timeout=60,
        headers={"content-type": "application/json"},
    )  # fmt: skip
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and words in error["message"], error
