"""Natural-text sources and token-length helpers for evaluation.

The fidelity tests and the natural-text RULER haystacks need real English prose that is
available offline and identical on every machine. CPython ships its own documentation
topics in `pydoc_data.topics`, so that is the default source; any UTF-8 file works too.

Token lengths are always measured with the caller's tokenizer (or a plain counting
function), never estimated from characters, because a "4k context" only means something
in the model's own tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "CountTokens",
    "TokenizerLike",
    "as_token_counter",
    "encode_ids",
    "pydoc_text",
    "read_text",
    "text_slice",
]

CountTokens = Callable[[str], int]


@runtime_checkable
class TokenizerLike(Protocol):
    """Anything with an `encode` method: a `transformers` tokenizer or a `tokenizers.Tokenizer`."""

    def encode(self, text: str, *args: Any, **kwargs: Any) -> Any: ...


def encode_ids(tokenizer: TokenizerLike, text: str) -> list[int]:
    """Token ids of `text` without special tokens, for either tokenizer family.

    `transformers` tokenizers return a list of ids, `tokenizers.Tokenizer` returns an
    `Encoding` with `.ids`; both accept `add_special_tokens`. BOS/EOS are left out because
    they belong to the whole prompt, not to a piece of text being measured.
    """
    encoded = tokenizer.encode(text, add_special_tokens=False)
    ids = getattr(encoded, "ids", encoded)
    return list(ids)


def as_token_counter(tokenizer_or_count: TokenizerLike | CountTokens) -> CountTokens:
    """Normalise a tokenizer-like object or a counting function to `str -> int`.

    The `encode` check comes first: `transformers` tokenizers are themselves callable, but
    calling them returns a `BatchEncoding`, not a count.
    """
    if hasattr(tokenizer_or_count, "encode"):
        tokenizer = tokenizer_or_count

        def count(text: str) -> int:
            return len(encode_ids(tokenizer, text))  # type: ignore[arg-type]

        return count
    if callable(tokenizer_or_count):
        return tokenizer_or_count
    raise TypeError(
        "expected a tokenizer with an `encode` method or a callable str -> int, "
        f"got {type(tokenizer_or_count).__name__}"
    )


@functools.cache
def pydoc_text() -> str:
    """CPython's bundled documentation topics as one deterministic English text.

    Values are joined in sorted key order so the text does not depend on dict order,
    which is whatever order the generator of `topics.py` happened to write.
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics))


def read_text(path: str | Path) -> str:
    """Read a UTF-8 text file, with an error that names the path when it is missing."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"text file not found: {file}")
    return file.read_text(encoding="utf-8")


def _largest_prefix(words: Sequence[str], start: int, budget: int, count: CountTokens) -> int:
    """Largest `n` with count(words[start:start+n]) <= budget, at word granularity.

    Exponential search first, so the cost grows with the window rather than with the
    whole text (tokenising 500 KB a dozen times would dominate a test run).
    """
    available = len(words) - start
    if budget <= 0 or available <= 0:
        return 0

    def fits(n: int) -> bool:
        return count(" ".join(words[start : start + n])) <= budget

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= available and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, available + 1)
    # Invariant: fits(lo) and (hi > available or not fits(hi)).
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def text_slice(
    text: str,
    tokenizer_or_count: TokenizerLike | CountTokens,
    num_tokens: int,
    offset: int = 0,
) -> str:
    """A window of about `num_tokens` tokens of `text`, starting `offset` tokens in.

    Works at word granularity, so the result is whole words joined by single spaces and
    `count(result) <= num_tokens`, short of it by less than one word's tokens (unless the
    text runs out). Cutting at words rather than decoding token ids keeps the window
    valid text for every tokenizer, so re-tokenising it gives the same count.
    """
    if num_tokens < 0 or offset < 0:
        raise ValueError(f"num_tokens and offset must be >= 0, got {num_tokens}, {offset}")
    count = as_token_counter(tokenizer_or_count)
    words = text.split()
    start = _largest_prefix(words, 0, offset, count) if offset else 0
    length = _largest_prefix(words, start, num_tokens, count)
    return " ".join(words[start : start + length])
