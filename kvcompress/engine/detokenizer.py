"""Incremental detokenization: each new token costs a decode of a few tokens, not all.

Decoding a window that starts at an earlier token (``prefix``) and comparing it with the
same window without the new tokens gives exactly the text they add, even for tokenizers that
strip a leading space at the start of a decode. A window ending in an incomplete UTF-8
character (U+FFFD) is held back until the next token completes it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DetokenizerState:
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0


def detokenize_step(tokenizer, ids: list[int], state: DetokenizerState) -> str:
    """Append the text of ``ids[state.read_offset:]`` to ``state.text``; returns the new text."""
    old = tokenizer.decode(ids[state.prefix_offset : state.read_offset], skip_special_tokens=True)
    new = tokenizer.decode(ids[state.prefix_offset :], skip_special_tokens=True)
    if len(new) <= len(old) or new.endswith("\ufffd"):
        return ""
    delta = new[len(old) :]
    state.text += delta
    state.prefix_offset = state.read_offset
    state.read_offset = len(ids)
    return delta
