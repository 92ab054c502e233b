"""Where words and numbers begin, from a vocabulary's pieces."""

from __future__ import annotations

import torch

from kvcompress.engine.token_spans import TokenSpans


def spans_as_text(pieces: list[str], starts: torch.Tensor) -> list[str]:
    out: dict[int, str] = {}
    for piece, start in zip(pieces, starts.tolist(), strict=True):
        out[start] = out.get(start, "") + piece
    return list(out.values())


def test_spans_begin_at_whitespace_punctuation_and_the_edges_of_digit_runs():
    # Byte-level BPE (Ġ space, Ċ newline) and SentencePiece (▁) pieces in one vocabulary.
    pieces = ["One", "Ġof", "Ġquick", "-", "fox", ":", "Ġ", "15", "8", "59", ".", "Ċ", "▁key",
              "s", "7", "x", "<|im_end|>", "fox", "Ġis", None, "fox"]  # fmt: skip
    spans = TokenSpans.from_pieces(pieces, special_ids=[16])
    ids = list(range(len(pieces)))
    starts = spans.span_starts(ids)
    # Span starts never pass their position, and never go back.
    assert (starts <= torch.arange(len(ids))).all() and (starts.diff() >= 0).all()
    got = spans_as_text([p or "?" for p in pieces], starts)
    assert got == ["One", "Ġof", "Ġquick", "-fox", ":", "Ġ", "15859", ".", "Ċ", "▁keys", "7",
                   "x", "<|im_end|>", "fox", "Ġis", "?", "fox"]  # fmt: skip
    # An id past the pieces (padded embedding rows) is a span of its own.
    assert spans.span_starts([2, 4, 99, 4, 999, 999]).tolist() == [0, 0, 2, 3, 4, 5]
    assert spans.span_starts([]).tolist() == []


def test_the_default_models_tokenizer_keeps_a_number_in_one_span(engine):
    tokenizer = engine.tokenizer
    spans = TokenSpans.from_tokenizer(tokenizer)
    text = "One of the special magic numbers for quick-fox is: 1585963.\nWhat is it?"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    words = spans_as_text(pieces, spans.span_starts(ids))
    assert "1585963" in words and len(pieces) > len(words)
    assert [tokenizer.convert_tokens_to_string([w]) for w in words[:4]] == [
        "One",
        " of",
        " the",
        " special",
    ]
