"""Where words and numbers begin: the spans the metric may be pooled over (``pool_spans``).

A token starts a new span when its text begins with whitespace or with a character that is
not a letter or digit, and where a run of digit tokens begins or ends; a special token (or
one without a piece) is a span of its own. So
``quick-fox is: 1585963.`` cut into tokens gives the spans `` quick``, ``-fox``, `` is``,
``:``, `` ``, ``1585963``, ``.``: a number written one token per digit is one span.

Which tokens begin with whitespace is read from the vocabulary's pieces once per tokenizer,
with the markers byte-level BPE (``Ġ`` space, ``Ċ`` newline, ``ĉ`` tab) and SentencePiece
(``▁``) write for it. The compression core only ever sees the result: each position's span
start (:func:`kvcompress.compress.metrics.span_max`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

# What byte-level BPE and SentencePiece pieces write for leading whitespace.
_WHITESPACE_MARKERS = "\u0120\u010a\u0109\u2581"


class TokenSpans:
    """Per token id of one vocabulary: whether it starts a span, whether it is digits,
    whether it is a span alone (the next token starts another)."""

    def __init__(self, starts: torch.Tensor, digits: torch.Tensor, alone: torch.Tensor) -> None:
        if not (starts.shape == digits.shape == alone.shape) or starts.dim() != 1:
            raise ValueError("starts, digits and alone are one bool per token id")
        self.starts = starts.bool() | alone.bool()
        self.digits = digits.bool()
        self.alone = alone.bool()

    @classmethod
    def from_pieces(
        cls, pieces: Sequence[str | None], special_ids: Iterable[int] = ()
    ) -> TokenSpans:
        """From each token id's piece (``tokenizer.convert_ids_to_tokens``); a special token
        or a missing piece is a span alone."""
        starts, digits, alone = [], [], []
        for piece in pieces:
            text = (piece or "").lstrip(_WHITESPACE_MARKERS)
            digits.append(text.isascii() and text.isdigit())
            starts.append(text != piece or not text[:1].isalnum())
            alone.append(not piece)
        flags = torch.tensor([starts, digits, alone], dtype=torch.bool)
        flags[2, [i for i in special_ids if 0 <= i < len(pieces)]] = True
        return cls(*flags)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> TokenSpans:
        """A Hugging Face tokenizer's vocabulary, added tokens included."""
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        return cls.from_pieces(pieces, tokenizer.all_special_ids)

    def span_starts(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """``[n]`` long: for each token of a sequence (from its first), the position of the
        first token of its span."""
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        n = ids.numel()
        # Ids past the tokenizer's pieces (a model whose embedding rows are padded) start
        # a span of their own, as a missing piece does.
        known = ids < self.starts.numel()
        ids = ids.clamp(max=self.starts.numel() - 1)
        boundary = self.starts[ids] | ~known
        digit = self.digits[ids] & known
        alone = self.alone[ids] | ~known
        boundary[1:] |= (digit[1:] != digit[:-1]) | alone[:-1]
        if n:
            boundary[0] = True
        positions = torch.arange(n)
        return torch.cummax(torch.where(boundary, positions, 0), dim=0).values
