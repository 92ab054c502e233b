"""Backend selection and the split plan (neither needs Triton installed)."""

from __future__ import annotations

import pytest

from kvcompress.attention import resolve_backend
from kvcompress.attention.triton import available, choose_splits
from kvcompress.attention.triton.splits import split_evenly


def test_auto_is_torch_on_cpu_and_unknown_names_are_refused() -> None:
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("torch", "cuda") == "torch"
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("flash", "cpu")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch) -> None:
    if not available():
        with pytest.raises(ValueError, match="needs Triton"):
            resolve_backend("triton", "cpu")
        return
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        resolve_backend("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", "cpu") == "triton"


@pytest.mark.parametrize(
    ("max_len", "rows", "expected_splits"),
    [
        (32768, 8, 33),  # one long sequence: ~2 programs per SM (132 SMs)
        (32768, 64 * 8, 1),  # a big batch fills the GPU alone
        (300, 8, 2),  # short heads: no range below 256 keys
        (0, 8, 1),
    ],
)
def test_split_count_follows_the_longest_head(max_len, rows, expected_splits) -> None:
    plan = choose_splits(max_len, rows, num_sms=132, block_n=64)
    assert plan.num_splits <= expected_splits
    assert plan.num_splits >= min(expected_splits, 32)  # tile rounding may merge a few
    assert plan.split_len % 64 == 0
    assert plan.num_splits * plan.split_len >= max_len  # every key is covered
    assert (plan.num_splits - 1) * plan.split_len < max(max_len, 1)  # no empty range


def test_even_splits_cover_the_keys_without_empty_ranges() -> None:
    for max_len in (1, 16, 37, 1000):
        for n in (1, 2, 3, 7):
            plan = split_evenly(max_len, n, 16)
            assert plan.num_splits <= n
            assert plan.num_splits * plan.split_len >= max_len
            assert (plan.num_splits - 1) * plan.split_len < max_len
