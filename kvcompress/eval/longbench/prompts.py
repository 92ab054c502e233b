"""LongBench prompts: the subset's template in two parts, cut to a token budget."""

from __future__ import annotations

from typing import NamedTuple

from kvcompress.eval.longbench.data import LongBenchExample
from kvcompress.eval.longbench.subsets import spec_for
from kvcompress.eval.texts import TokenizerLike, encode_ids

__all__ = ["LongBenchPrompt", "format_prompt", "truncate_middle"]


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
