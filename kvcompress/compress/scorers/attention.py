"""Attention of given queries over every head's held KVs (shared by the query scorers)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from kvcompress.compress.metrics import pool_by_position


class Pooling(NamedTuple):
    """Max-pooling along token positions, then over spans, per sequence
    (``pool_by_position``)."""

    positions: torch.Tensor  # [S, LH, W] each slot's token position
    kernels: torch.Tensor  # [S] long: each sequence's pool width (1: none)
    by_span: torch.Tensor | None = None  # [S] bool: also over its spans (None: none does)
    spans: torch.Tensor | None = None  # [S, P] long: span start of each position


def group_attention(
    logits: torch.Tensor,  # [S, LH, G, W] logits per query head of a group (overwritten)
    valid: torch.Tensor,  # [S, LH, W] bool: the slot holds a KV
    pooling: Pooling | None = None,
) -> torch.Tensor:
    """Softmax over each head's held KVs, max-pooled along token positions per query head
    if ``pooling`` is given (as the window metric is), summed over the group: ``[S, LH, W]``,
    0 on padding.

    The pooling matters beyond one head: a query attends to a fact's first tokens more than
    to its middle ones, and without it the global selection keeps a number's first digits in
    one head and its last in another (measured in ``docs/quality.md``)."""
    unheld = ~valid.unsqueeze(2)
    probs = torch.softmax(logits.masked_fill_(unheld, float("-inf")), dim=-1)
    # A head holding nothing has an all -inf row, NaN after the softmax: it scores 0.
    probs.masked_fill_(unheld, 0.0)
    if pooling is not None:
        kernels = pooling.kernels.tolist()
        by_span = [False] * len(kernels) if pooling.by_span is None else pooling.by_span.tolist()
        ways = list(zip(kernels, by_span, strict=True))
        if len(set(ways)) == 1:  # the usual pass: no copy of rows in and out
            return _pool(probs, pooling, valid, slice(None), *ways[0]).sum(dim=2)
        for way in sorted(set(ways)):
            rows = [i for i, w in enumerate(ways) if w == way]
            probs[rows] = _pool(probs[rows], pooling, valid[rows], rows, *way)
    return probs.sum(dim=2)


def _pool(
    probs: torch.Tensor,  # [s, LH, G, W]
    pooling: Pooling,
    valid: torch.Tensor,  # [s, LH, W]
    rows: list[int] | slice,  # the s sequences' rows of ``pooling`` (a slice: no copy)
    kernel: int,
    by_span: bool,
) -> torch.Tensor:
    """``pool_by_position`` over sequences that pool alike."""
    s, LH, G, W = probs.shape
    spans = None
    if by_span:
        assert pooling.spans is not None, "the compressor checks that spans are given"
        spans = pooling.spans[rows].repeat_interleave(LH, dim=0)  # [s * LH, P]
    pooled = pool_by_position(
        probs.view(-1, G, W),
        pooling.positions[rows].reshape(-1, W),
        valid.reshape(-1, W),
        kernel,
        spans,
    )
    return pooled.view(s, LH, G, W)
