"""The length search: the largest haystack whose prompt fits a token budget."""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["fit_units"]


def fit_units(measure: Callable[[int], int], target: int, min_units: int) -> int:
    """Largest haystack size whose prompt is at most `target` tokens.

    Prompt length grows almost linearly with haystack size, so the search extrapolates
    to a size just past the target, then interpolates inside the bracket, falling back
    to bisection when an interpolation step does not halve it. That takes about six
    tokenisations of a target-sized prompt, against ~15 for plain bisection. Length is
    assumed to grow with size, which holds up to tokenizer noise at needle seams.
    """
    base = measure(min_units)
    if base > target:
        raise ValueError(
            f"target of {target} tokens is too short: the prompt needs {base} tokens "
            "before any haystack is added"
        )
    lo, hi = min_units, min_units + 32
    while measure(hi) <= target:
        lo = hi
        slope = max((measure(lo) - base) / (lo - min_units), 1e-3)
        # Aim 1% past the target so the next probe most likely closes the bracket.
        hi = max(lo + 1, min_units + math.ceil((1.01 * target - base) / slope))
    # Invariant: measure(lo) <= target < measure(hi).
    bisect = False
    while hi - lo > 1:
        width = hi - lo
        if bisect:
            mid = (lo + hi) // 2
        else:
            m_lo, m_hi = measure(lo), measure(hi)
            mid = lo + (target - m_lo) * width // max(m_hi - m_lo, 1)
            mid = min(max(mid, lo + 1), hi - 1)
        if measure(mid) <= target:
            lo = mid
        else:
            hi = mid
        bisect = not bisect and (hi - lo) * 2 > width
    return lo
