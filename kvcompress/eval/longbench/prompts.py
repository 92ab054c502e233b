"""LongBench prompts: the subset's template in two parts, cut to a token budget."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from kvcompress.eval.longbench.data import LongBenchExample
from kvcompress.eval.longbench.subsets import spec_for
from kvcompress.eval.texts import TokenizerLike, encode_ids

__all__ = ["LongBenchPrompt", "fit_example", "format_prompt", "truncate_middle"]


class LongBenchPrompt(NamedTuple):
    """A prompt in two parts; the long `context` comes first, the `question` last."""

    context: str
    question: str

    @property
    def text(self) -> str:
        return self.context + self.question


def format_prompt(subset: str, example: LongBenchExample) -> LongBenchPrompt:
    """The subset's prompt for `example`, as (context part, question part)."""
    spec = spec_for(subset)
    return LongBenchPrompt(
        spec.context_template.format(context=example.context, input=example.input),
        spec.question_template.format(context=example.context, input=example.input),
    )


def truncate_middle(text: str, tokenizer: TokenizerLike, max_tokens: int) -> str:
    """Cut tokens from the middle of `text` so that it has at most `max_tokens` tokens.

    LongBench's convention for prompts longer than the model's window: instructions sit
    at both ends, so the middle of the context is the part to lose. Decoding may shift
    the count by a token or two at the seam; leave that much slack in `max_tokens`.
    """
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
    ids = encode_ids(tokenizer, text)
    if len(ids) <= max_tokens:
        return text
    half = max_tokens // 2
    decode = tokenizer.decode  # type: ignore[attr-defined]
    head = decode(ids[:half], skip_special_tokens=True)
    tail = decode(ids[len(ids) - (max_tokens - half) :], skip_special_tokens=True)
    return head + tail


def fit_example(
    tokenizer: TokenizerLike, subset: str, example: LongBenchExample, length: int, overhead: int
) -> LongBenchExample:
    """The example with its context cut in the middle so the whole prompt fits `length`.

    `overhead` counts the tokens a chat template adds around the prompt; the few tokens
    of slack cover re-tokenisation at the cut.
    """
    empty = format_prompt(subset, dataclasses.replace(example, context=""))
    fixed = len(encode_ids(tokenizer, empty.text)) + overhead + 8
    budget = length - fixed
    if budget < 16:
        raise ValueError(
            f"length {length} is too short for {subset}: its prompt needs {fixed} tokens "
            "besides the context"
        )
    return dataclasses.replace(example, context=truncate_middle(example.context, tokenizer, budget))
