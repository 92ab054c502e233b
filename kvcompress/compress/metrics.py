"""The eviction metric: how much attention each cached KV has received.

L2-sum (default): sum over observed queries of the squared attention probability, summed over
the query heads of the KV head's GQA group. L1 variants skip the square; the "avg" variants
divide by the number of queries a KV has seen, which is applied when scoring (see
:func:`kvcompress.compress.scoring.eviction_scores`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kvcompress.errors import InvalidParameterError

METRICS = ("l2-sum", "l1-sum", "l2-avg", "l1-avg")
# The collection settings a request may set for itself (``CompressionParams`` fields of the
# same names; None there means the engine's ``MetricConfig``).
METRIC_SETTINGS = ("window_size", "collection_buffer", "pool_kernel", "pool_spans")


def metric_power(metric: str) -> int:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    return 2 if metric.startswith("l2") else 1


def check_metric_setting(name: str, value: Any) -> None:
    """Raise ``InvalidParameterError`` naming ``name`` unless ``value`` is a valid setting
    (the one rule for the engine's ``MetricConfig`` and a request's own settings)."""
    integer = isinstance(value, int) and not isinstance(value, bool)
    if name == "window_size" and not (integer and value >= 1):
        raise InvalidParameterError(
            f"window_size must be an integer >= 1, got {value!r}", param=name
        )
    if name == "collection_buffer" and not (integer and value >= 0):
        raise InvalidParameterError(
            f"collection_buffer must be an integer >= 0, got {value!r}", param=name
        )
    if name == "pool_kernel" and not (integer and value >= 1 and value % 2 == 1):
        raise InvalidParameterError(
            f"pool_kernel must be a positive odd integer, got {value!r}", param=name
        )
    if name == "pool_spans" and not isinstance(value, bool):
        raise InvalidParameterError(f"pool_spans must be a boolean, got {value!r}", param=name)


@dataclass(frozen=True)
class MetricConfig:
    """How the metric is collected: the engine's defaults, which a request may override
    field by field (``CompressionParams.metric_settings``)."""

    window_size: int = 32  # observation window: the last queries of each prefill chunk
    collection_buffer: int = 0  # skip query-key pairs closer than this many positions
    # 1-D max-pool along the key axis; 1 disables pooling. 21, not the paper's 7: a number
    # written a digit per token survives whole in the same heads (docs/quality.md).
    pool_kernel: int = 21
    # After the positional pool, each KV takes the maximum over its span (a word or a
    # number, cut by the engine from the tokens): a fact is kept whole wherever the queries
    # touch it, so the positional pool may be narrow (docs/quality.md, "Pooling that follows
    # words and numbers").
    pool_spans: bool = False

    def __post_init__(self) -> None:
        for name in METRIC_SETTINGS:
            check_metric_setting(name, getattr(self, name))


def window_metric(
    q_window: torch.Tensor,  # [Hq, w, D], the last w queries of one prompt
    k: torch.Tensor,  # [T, Hkv, D], all keys of that prompt
    scale: float,
    power: int,
    config: MetricConfig,
    spans: torch.Tensor | None = None,  # [T] long: each position's span start (pool_spans)
) -> torch.Tensor:
    """Initial metric ``[Hkv, T]`` of a prompt's KVs from its observation window."""
    num_q_heads, w, _ = q_window.shape
    T, num_kv_heads, _ = k.shape
    group = num_q_heads // num_kv_heads
    keys = k.transpose(0, 1).repeat_interleave(group, dim=0).float()  # [Hq, T, D]
    logits = torch.matmul(q_window.float(), keys.transpose(1, 2)) * scale  # [Hq, w, T]
    q_pos = torch.arange(T - w, T, device=k.device).view(w, 1)
    k_pos = torch.arange(T, device=k.device).view(1, T)
    logits = logits.masked_fill(k_pos > q_pos, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if power == 2:
        probs = probs * probs
    if config.collection_buffer:
        probs = probs.masked_fill((q_pos - k_pos) < config.collection_buffer, 0.0)
    return pool_and_group(probs.sum(dim=1), num_kv_heads, config.pool_kernel, spans)


def pool_and_group(
    per_head: torch.Tensor,
    num_kv_heads: int,
    pool_kernel: int,
    spans: torch.Tensor | None = None,
) -> torch.Tensor:
    """The window's summed probabilities per query head ``[Hq, T]`` -> the metric
    ``[Hkv, T]``: max-pooled along key positions (then over each span, when ``spans [T]``
    gives each position's span start), then summed over each GQA group (shared by the
    Triton window kernel, so both paths agree exactly)."""
    num_q_heads, T = per_head.shape
    if pool_kernel > 1:
        pad = pool_kernel // 2
        per_head = F.max_pool1d(per_head.unsqueeze(1), pool_kernel, 1, pad).squeeze(1)
    if spans is not None:
        per_head = span_max(per_head.unsqueeze(0), spans.view(1, -1)).squeeze(0)
    return per_head.view(num_kv_heads, num_q_heads // num_kv_heads, T).sum(dim=1)


def span_max(grid: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """Each column of ``grid [H, G, N]`` (indexed by token position) replaced by the
    maximum over its span's columns. ``spans [H, P]`` gives each position's span start (the
    position of the span's first token, so never past it); columns past ``P`` are spans of
    their own. Unheld positions must hold ``-inf``: they add nothing."""
    H, G, N = grid.shape
    index = torch.arange(N, device=grid.device).expand(H, N)
    if spans.shape[1] < N:
        index = index.clone()
        index[:, : spans.shape[1]] = spans
    else:
        index = spans[:, :N]
    index = index.unsqueeze(1).expand(H, G, N)
    best = grid.new_full((H, G, N), float("-inf"))
    best.scatter_reduce_(-1, index, grid, reduce="amax")
    return best.gather(-1, index)


def pool_by_position(
    scores: torch.Tensor,  # [H, G, W] per query head, in each KV head's slot order
    positions: torch.Tensor,  # [H, W] each slot's token position
    valid: torch.Tensor,  # [H, W] bool: the slots the head holds
    pool_kernel: int,
    spans: torch.Tensor | None = None,  # [H, P] long: span start of each position held
) -> torch.Tensor:
    """Max-pool ``scores`` along token positions when a head's KVs are neither contiguous
    nor in position order (after compaction): each held slot takes the maximum over the held
    slots within ``pool_kernel // 2`` positions of its own, then (``spans``) the maximum of
    that over the held slots of its span; unheld slots keep their score. On contiguous
    positions this is the window metric's ``max_pool1d`` (and span maximum).

    The held scores are scattered onto a grid indexed by position (``-inf`` where a head
    holds nothing), pooled there by ``max_pool1d``, and read back: a few passes over
    ``[H, G, positions]``, where comparing each slot with its neighbours in position order
    would build ``pool_kernel`` copies of the scores."""
    H, G, W = scores.shape
    if (pool_kernel <= 1 and spans is None) or W == 0:
        return scores
    slot = torch.arange(W, device=positions.device)
    if bool(((positions == slot) | ~valid).all()):
        # Each held slot holds its own position (a prompt not yet compacted): the slots are
        # the grid, and the scatter onto one and the read back would be copies.
        grid = scores.masked_fill(~valid.unsqueeze(1), float("-inf"))
        return torch.where(valid.unsqueeze(1), _pool_grid(grid, valid, pool_kernel, spans), scores)
    size = int(positions.masked_fill(~valid, 0).max()) + 1
    # Unheld slots all go to one extra column, cleared before pooling.
    at = torch.where(valid, positions.long(), size).unsqueeze(1).expand(H, G, W)
    grid = scores.new_full((H, G, size + 1), float("-inf")).scatter_(-1, at, scores)
    grid[..., size] = float("-inf")
    held = None
    if spans is not None:
        held = torch.zeros(H, size + 1, dtype=torch.bool, device=valid.device)
        held.scatter_(-1, at[:, 0], valid)
    pooled = _pool_grid(grid, held, pool_kernel, spans).gather(-1, at)
    return torch.where(valid.unsqueeze(1), pooled, scores)


def _pool_grid(
    grid: torch.Tensor,
    held: torch.Tensor | None,
    pool_kernel: int,
    spans: torch.Tensor | None,
) -> torch.Tensor:
    """``grid [H, G, N]`` indexed by position (``-inf`` where ``held [H, N]`` is false),
    max-pooled along positions and then over the held positions of each span (``held`` is
    read only with ``spans``)."""
    H, G, N = grid.shape
    if pool_kernel > 1:
        grid = F.max_pool1d(grid.view(H * G, 1, N), pool_kernel, 1, pool_kernel // 2)
        grid = grid.view(H, G, N)
        if spans is not None and held is not None:
            # The pool spread held values onto unheld positions, which a span must not add.
            grid = grid.masked_fill(~held.unsqueeze(1), float("-inf"))
    return grid if spans is None else span_max(grid, spans)


def decode_metric(probs: torch.Tensor, power: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """What one decode step adds to each KV's metric.

    ``probs [B, Hq, Lmax]`` are the step's attention probabilities per query head over each KV
    head's held KVs; ``power [B]`` is 1 or 2 per sequence. Returns ``[B, Hkv, Lmax]``.
    """
    B, num_q_heads, lmax = probs.shape
    probs = probs.float()
    contrib = torch.where(power.view(B, 1, 1) == 2, probs * probs, probs)
    return contrib.view(B, num_kv_heads, num_q_heads // num_kv_heads, lmax).sum(dim=2)
