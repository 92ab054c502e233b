"""Per-request compression parameters and the policies that interpret them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

from kvcompress.compress.metrics import METRICS, metric_power

Allocation = Literal["global", "per_head", "pyramid", "none"]
Score = Literal["metric", "position", "random"]


class Policy(NamedTuple):
    """How a policy scores KVs and how it shares a sequence's budget among its heads."""

    name: str
    score: Score
    allocation: Allocation
    metric: str | None  # forces a metric variant; None: the request's own


POLICIES: dict[str, Policy] = {
    # KV-Compress: one budget for the whole sequence, spread unevenly over layers and heads.
    "kvcompress": Policy("kvcompress", "metric", "global", None),
    # SnapKV-like: the same metric, the same number of KVs in every head.
    "uniform": Policy("uniform", "metric", "per_head", None),
    # PyramidKV-like: per-layer budgets decreasing with depth, uniform within a layer.
    "pyramid": Policy("pyramid", "metric", "pyramid", None),
    # StreamingLLM: attention sinks plus the most recent tokens.
    "streaming": Policy("streaming", "position", "per_head", None),
    # H2O: accumulated (L1) attention, the same number of KVs in every head.
    "h2o": Policy("h2o", "metric", "per_head", "l1-sum"),
    # Control: random KVs, the same number in every head.
    "random": Policy("random", "random", "per_head", None),
    "full": Policy("full", "metric", "none", None),
}


@dataclass(frozen=True)
class CompressionParams:
    """What one request asks of compression.

    Give at most one of ``compression_rate`` (c >= 1: keep about 1/c of the non-protected
    KVs seen) and ``max_cache_tokens`` (average KVs kept per head, shared across all heads and
    layers). With neither, nothing is evicted.
    """

    policy: str = "kvcompress"
    compression_rate: float | None = None
    max_cache_tokens: int | None = None
    protected_window: int = 32
    sinks: int = 0
    metric: str = "l2-sum"
    compress_once: bool = False
    compression_interval: int | None = None  # decode steps between compressions

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose from {', '.join(POLICIES)}")
        if self.compression_rate is not None and self.max_cache_tokens is not None:
            raise ValueError("give compression_rate or max_cache_tokens, not both")
        if self.compression_rate is not None and not (
            isinstance(self.compression_rate, int | float)
            and math.isfinite(self.compression_rate)
            and self.compression_rate >= 1
        ):
            raise ValueError(
                f"compression_rate must be a number >= 1, got {self.compression_rate!r}"
            )
        if self.max_cache_tokens is not None and (
            not isinstance(self.max_cache_tokens, int) or self.max_cache_tokens < 1
        ):
            raise ValueError(
                f"max_cache_tokens must be an integer >= 1, got {self.max_cache_tokens!r}"
            )
        for name in ("protected_window", "sinks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; choose from {', '.join(METRICS)}")
        if self.compression_interval is not None and (
            not isinstance(self.compression_interval, int) or self.compression_interval < 1
        ):
            raise ValueError(
                f"compression_interval must be an integer >= 1, got {self.compression_interval!r}"
            )

    @property
    def policy_spec(self) -> Policy:
        return POLICIES[self.policy]

    @property
    def effective_metric(self) -> str:
        return self.policy_spec.metric or self.metric

    @property
    def power(self) -> int:
        """Exponent applied to attention probabilities when accumulating the metric."""
        return metric_power(self.effective_metric)

    @property
    def evicts(self) -> bool:
        if self.policy_spec.allocation == "none":
            return False
        if self.max_cache_tokens is not None:
            return True
        return self.compression_rate is not None and self.compression_rate > 1
