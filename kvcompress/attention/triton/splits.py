"""How many parts ("flash-decoding" splits) each head's keys are cut into.

Decode runs one program per (sequence, KV head): a batch of one long sequence would occupy a
handful of the GPU's multiprocessors while the others idle. Cutting every head's keys into
``num_splits`` ranges of ``split_len`` keys multiplies the programs; a second kernel combines
the parts' (max, sum, accumulator). Pure Python, so it is tested without Triton.
"""

from __future__ import annotations

from typing import NamedTuple


class SplitPlan(NamedTuple):
    num_splits: int  # key ranges per head (1: no reduce kernel)
    split_len: int  # keys per range, a multiple of the kernel's key tile


def choose_splits(
    max_len: int,
    rows: int,
    num_sms: int,
    block_n: int,
    min_split_len: int = 256,
    max_splits: int = 64,
) -> SplitPlan:
    """Splits for ``rows`` (sequence, KV head) programs whose longest head holds ``max_len``.

    Aims at two programs per multiprocessor, never cutting a range below ``min_split_len``
    keys (a part must amortise its partial results' write and the reduce).
    """
    if max_len <= 0 or rows <= 0:
        return SplitPlan(1, block_n)
    wanted = _cdiv(2 * num_sms, rows)
    worth = max(1, _cdiv(max_len, min_split_len))
    return split_evenly(max_len, max(1, min(wanted, worth, max_splits)), block_n)


def split_evenly(max_len: int, num_splits: int, block_n: int) -> SplitPlan:
    """At most ``num_splits`` ranges of equal, tile-rounded length covering ``max_len`` keys
    (fewer when rounding up to whole tiles leaves the last ones empty)."""
    split_len = _cdiv(_cdiv(max(max_len, 1), num_splits), block_n) * block_n
    return SplitPlan(_cdiv(max(max_len, 1), split_len), split_len)


def _cdiv(a: int, b: int) -> int:
    return -(a // -b)
