"""Prompts as token ids in two parts, a context and a question, raw or in a chat template."""

from __future__ import annotations

from typing import Any, NamedTuple

from kvcompress.eval.texts import encode_ids

__all__ = ["PromptIds", "chat_overhead", "encode_prompt", "split_answer_prefix"]


class PromptIds(NamedTuple):
    """A prompt as token ids: `context` is always prefilled; `question` follows it."""

    context: list[int]
    question: list[int]


def split_answer_prefix(question: str) -> tuple[str, str]:
    """Split a RULER question into the query and the answer prefix that follows it.

    RULER questions end with the start of the answer ("What is the pass key? The pass
    key is"), which steers a base model. An instruct model is asked the query as the
    user and gets the prefix after its assistant header instead, so that the answer it
    writes continues the prefix. A question with no "? " has no prefix.
    """
    at = question.rfind("? ")
    if at < 0:
        return question, ""
    prefix = question[at + 2 :]
    prefix = prefix.removeprefix("Answer:").lstrip()
    return question[: at + 1], prefix


def encode_prompt(
    tokenizer: Any, context: str, question: str, chat: bool, answer_prefix: bool
) -> PromptIds:
    """Token ids for `context` then `question`, raw or wrapped in the chat template.

    With `chat`, the user message is context + query and the template's assistant
    header follows; with `answer_prefix` the question's answer prefix comes after that
    header (see `split_answer_prefix`). The rendered template is cut where the query
    starts, so the context part ends exactly where the raw context would.
    """
    if not chat:
        ctx = list(tokenizer(context, add_special_tokens=True)["input_ids"])
        return PromptIds(ctx, encode_ids(tokenizer, question))
    query, prefix = split_answer_prefix(question) if answer_prefix else (question, "")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; use --no-chat")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": context + query}], tokenize=False, add_generation_prompt=True
    )
    # Templates may strip the message, so look for the query without its leading space.
    at = rendered.rfind(query.strip()) if query.strip() else -1
    if at < 0:
        raise ValueError("could not locate the question inside the rendered chat template")
    head, tail = rendered[:at], rendered[at:] + prefix
    return PromptIds(encode_ids(tokenizer, head), encode_ids(tokenizer, tail))


def chat_overhead(tokenizer: Any) -> int:
    """Tokens the chat template adds around a user message (to keep lengths honest)."""
    empty = tokenizer.apply_chat_template(
        [{"role": "user", "content": ""}], tokenize=False, add_generation_prompt=True
    )
    return len(encode_ids(tokenizer, empty))
