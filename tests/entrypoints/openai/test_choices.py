"""n and best_of through the real server and the openai client: one prefill, forked choices."""

from __future__ import annotations

import openai
import pytest

from tests.entrypoints.openai.test_server import MODEL, start_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client():
    srv = start_server(max_num_seqs=8)
    yield openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
    srv.stop()


def chat(client, **kwargs):
    messages = [{"role": "user", "content": "Name a colour."}]
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, **kwargs)


def test_n3_returns_three_choices_equal_when_greedy(client):
    resp = chat(client, n=3, temperature=0)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert len({c.message.content for c in resp.choices}) == 1
    assert resp.usage.completion_tokens == 3 * 6  # every choice's tokens
    # Each choice's kv statistics count its shared prompt blocks, flagged as shared.
    assert resp.choices[1].model_extra["kv"]["blocks_shared"] > 0


def test_seeded_choices_are_reproducible(client):
    a = chat(client, n=3, temperature=1, seed=7)
    b = chat(client, n=3, temperature=1, seed=7)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len(a.choices) == 3


def test_streamed_chunks_carry_their_choice_index(client):
    stream = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=5, n=2, temperature=1, seed=3,
        stream=True,
    )  # fmt: skip
    texts, finished = {0: "", 1: ""}, set()
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason is not None:
                finished.add(choice.index)
    assert finished == {0, 1} and all(texts.values())
    plain = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=5, n=2, temperature=1, seed=3
    )
    assert [c.text for c in plain.choices] == [texts[0], texts[1]]


def test_best_of_returns_n_choices(client):
    resp = client.completions.create(
        model=MODEL, prompt="The sky is", max_tokens=4, n=2, best_of=4, temperature=1, seed=2
    )
    assert [c.index for c in resp.choices] == [0, 1]
