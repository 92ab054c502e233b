"""Haystacks: filler words read from a repeated or natural text, and needles woven in."""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from typing import NamedTuple

from kvcompress.eval.ruler.plan import RulerConfig
from kvcompress.eval.texts import pydoc_text

__all__ = ["Haystack", "draw_haystack", "needle_depths", "weave"]

# Neutral sentences with no digits and no capitalised key-like words, so that no needle
# value or variable name can occur in the filler by accident.
_FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is warm.",
    "The river runs to the sea.",
    "The road goes on and on.",
)

_SENTENCE_END = (".", "!", "?")


@functools.lru_cache(maxsize=4)
def _words(text: str) -> tuple[str, ...]:
    words = tuple(text.split())
    if not words:
        raise ValueError("haystack_text has no words")
    return words


class Haystack(NamedTuple):
    """Filler words read cyclically from `start`, and the text they come from.

    The haystack is sized in words rather than sentences so that the prompt can land
    within a token or two of the target; needles are still placed at sentence ends.
    """

    words: tuple[str, ...]
    start: int
    source: str  # needle values must not occur here, to keep answers unambiguous

    def take(self, n: int) -> list[str]:
        size = len(self.words)
        return [self.words[(self.start + i) % size] for i in range(n)]


def draw_haystack(rng: random.Random, cfg: RulerConfig) -> Haystack:
    if cfg.haystack == "repeat":
        source = " ".join(_FILLER)
        return Haystack(_words(source), 0, source)
    text = cfg.haystack_text if cfg.haystack_text is not None else pydoc_text()
    words = _words(text)
    # Start at a sentence beginning somewhere in the text, so samples differ.
    start = _snap_to_sentence(words, rng.randrange(len(words)))
    return Haystack(words, start, text)


def _snap_to_sentence(words: Sequence[str], index: int, reach: int = 64) -> int:
    """The last sentence start at or before `index`, if one is within `reach` words.

    Text without full stops nearby (tables, code) has no boundary to snap to; then the
    index is kept rather than moving a needle far from its intended depth.
    """
    for i in range(index, max(index - reach, -1), -1):
        if i == 0 or words[i - 1].endswith(_SENTENCE_END):
            return i
    return index


def needle_depths(rng: random.Random, cfg: RulerConfig, count: int) -> list[float]:
    """Depths for `count` needles; the first is the configured (or queried) one."""
    first = cfg.depth if cfg.depth is not None else rng.random()
    return [first] + [rng.random() for _ in range(count - 1)]


def weave(filler: list[str], needles: Sequence[tuple[float, str]]) -> str:
    """Insert needles into the filler words at their depths, at sentence boundaries.

    Sorting is stable and snapping is monotone, so needles keep their given order when
    their depths ascend (which keeps variable-tracking chains in assignment order).
    """
    slots = sorted(
        ((_snap_to_sentence(filler, round(d * len(filler))), text) for d, text in needles),
        key=lambda slot: slot[0],
    )
    out: list[str] = []
    cursor = 0
    for slot, text in slots:
        out.extend(filler[cursor:slot])
        out.append(text)
        cursor = slot
    out.extend(filler[cursor:])
    return " ".join(out)
