"""Prompts as token ids: the answer prefix, and the chat template cut at the question."""

from __future__ import annotations

import pytest

from kvcompress.eval.prompts import encode_prompt, split_answer_prefix
from kvcompress.eval.ruler import generate_sample
from tests.eval.conftest import whitespace_count
from tests.eval.shared_engine import shared_engine


@pytest.mark.parametrize("task", ["niah_single", "niah_multikey", "vt", "cwe", "fwe"])
def test_answer_prefix_split(task):
    sample = generate_sample(task, 200, whitespace_count)
    query, prefix = split_answer_prefix(sample.question)
    assert query.endswith("?")
    assert prefix and not prefix.startswith("Answer")
    assert sample.question.startswith(query) and sample.question.endswith(prefix)


def test_question_without_prefix_is_left_whole():
    assert split_answer_prefix("\n\nSummarize.") == ("\n\nSummarize.", "")


@pytest.mark.slow
def test_chat_prompt_puts_answer_prefix_after_assistant_header():
    tokenizer = shared_engine().tokenizer
    sample = generate_sample("niah_single", 200, tokenizer)
    ids = encode_prompt(tokenizer, sample.context, sample.question, chat=True, answer_prefix=True)
    question = tokenizer.decode(ids.question)
    assert question.startswith("What is the pass key?")
    assert question.endswith("assistant\nThe pass key is")
    assert "<|im_start|>user" in tokenizer.decode(ids.context)
    raw = encode_prompt(tokenizer, sample.context, sample.question, chat=False, answer_prefix=True)
    assert tokenizer.decode(raw.context + raw.question) == sample.prompt
