"""The engine's token logprobs in OpenAI's two response shapes.

Completions use the legacy object (``tokens``, ``token_logprobs``, ``top_logprobs`` as one
dict per token, ``text_offset``), chat the newer one (``content``: one object per token with
its ``bytes`` and a list of ``top_logprobs``). A stream sends the part of each chunk's
tokens; the legacy ``text_offset`` runs on across the parts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kvcompress.engine import RequestOutput, TokenLogprob

# JSON has no -inf; a token the model rules out entirely gets vLLM's stand-in instead.
FLOOR = -9999.0

# (token id, its logprob entry); the entry is None for the prompt's first token.
Entry = tuple[int, TokenLogprob | None]


def _value(logprob: float) -> float:
    return max(logprob, FLOOR)


class TokenTexts:
    """Each token id's text, decoded once per server (the vocabulary bounds the cache)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)


def entries(out: RequestOutput) -> list[Entry]:
    """What one engine output adds: its prompt's tokens (once, when asked: echo) and its
    new tokens."""
    found: list[Entry] = []
    if out.prompt_logprobs is not None and out.prompt_token_ids is not None:
        found.extend(zip(out.prompt_token_ids, out.prompt_logprobs, strict=True))
    found.extend((e.token_id, e) for e in out.logprobs or ())
    return found


class CompletionLogprobs:
    """The legacy completions ``logprobs`` object, one part at a time."""

    def __init__(self, texts: TokenTexts) -> None:
        self.texts = texts
        self.offset = 0  # characters of the choice's text before the next token

    def part(self, found: Iterable[Entry]) -> dict[str, Any]:
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top_logprobs: list[dict[str, float] | None] = []
        text_offset: list[int] = []
        for token_id, entry in found:
            text = self.texts(token_id)
            tokens.append(text)
            text_offset.append(self.offset)
            self.offset += len(text)
            if entry is None:
                token_logprobs.append(None)
                top_logprobs.append(None)
                continue
            token_logprobs.append(_value(entry.logprob))
            top = {self.texts(t): _value(lp) for t, lp in entry.top}
            # As OpenAI does, the chosen token is always listed (so up to k + 1 entries).
            top.setdefault(text, _value(entry.logprob))
            top_logprobs.append(top)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": text_offset,
        }


class ChatLogprobs:
    """The chat ``logprobs`` object (``content`` of the part's tokens)."""

    def __init__(self, texts: TokenTexts) -> None:
        self.texts = texts

    def _token(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.texts(token_id)
        return {"token": text, "logprob": _value(logprob), "bytes": list(text.encode())}

    def part(self, found: Iterable[Entry]) -> dict[str, Any]:
        content = []
        for token_id, entry in found:
            if entry is None:  # only prompt tokens lack one, and chat never echoes them
                continue
            item = self._token(token_id, entry.logprob)
            item["top_logprobs"] = [self._token(t, lp) for t, lp in entry.top]
            content.append(item)
        return {"content": content, "refusal": None}
