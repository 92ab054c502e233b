"""Random needle values, keys, variable names and words, drawn so answers stay unambiguous."""

from __future__ import annotations

import random
import string
from collections.abc import Callable

__all__ = ["code_word", "fresh", "key", "number", "pseudo_word", "var_name"]

# Keys are adjective-noun pairs ("amber-anchor"): 900 of them, easy to read and quote.
# fmt: off
_ADJECTIVES = (
    "amber", "brave", "calm", "dusty", "eager", "fancy", "gentle", "hollow", "icy", "jolly",
    "keen", "lively", "misty", "noble", "odd", "proud", "quiet", "rapid", "silent", "tidy",
    "vivid", "witty", "young", "zesty", "bold", "crisp", "deep", "faint", "grand", "lucky",
)
_NOUNS = (
    "anchor", "badger", "candle", "dolphin", "engine", "falcon", "garden", "harbor", "island",
    "jacket", "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quartz", "river",
    "saddle", "tunnel", "umbrella", "violin", "walnut", "yacht", "zebra", "bridge", "castle",
    "desert", "forest", "glacier",
)
# fmt: on

_CONSONANTS = "bdfghklmnprstvz"
_VOWELS = "aeiou"


def fresh(
    rng: random.Random, make: Callable[[random.Random], str], count: int, avoid: str
) -> list[str]:
    """`count` distinct items from `make`, none occurring in `avoid`.

    Items that already occur in the haystack source would make the answer ambiguous
    (and string matching meaningless), so they are redrawn.
    """
    items: list[str] = []
    seen: set[str] = set()
    attempts = 0
    while len(items) < count:
        attempts += 1
        if attempts > 1000 * count + 1000:
            raise RuntimeError(f"could not draw {count} distinct items; vocabulary too small")
        item = make(rng)
        if item not in seen and item not in avoid:
            seen.add(item)
            items.append(item)
    return items


def number(digits: int) -> Callable[[random.Random], str]:
    # Fixed digit count, leading digit non-zero: no value is a substring of another.
    return lambda rng: str(rng.randrange(10 ** (digits - 1), 10**digits))


def key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def var_name(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_uppercase, k=5))


def pseudo_word(rng: random.Random) -> str:
    # Three consonant-vowel syllables: pronounceable, and all the same length, so no
    # word is a substring of another and substring scoring stays exact.
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(3))


def code_word(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=4))
