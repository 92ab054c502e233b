"""What an evaluation reports: one row per (task, length, policy, rate), kept-KV grids, and
the JSON document that holds them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from kvcompress.eval.sweep import Setting

__all__ = ["EvalResult", "KeptGrid", "Row", "format_cell"]


@dataclass(frozen=True)
class Row:
    """One line of the report: a policy at a rate on one task and length.

    Generation suites fill `score` (0-100); the fidelity suite fills `agreement` (top-1
    agreement with the full cache, 0-1) and `kl` (mean KL(full || compressed), nats).
    `achieved_rate` is the mean over samples of kvs_seen / kvs_kept at the end of each
    request, so it includes the uncompressed protected window and generated tokens.
    """

    suite: str
    task: str
    length: int
    policy: str
    rate: float
    achieved_rate: float
    num_samples: int
    score: float | None = None
    agreement: float | None = None
    kl: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """Fields in display order, leaving out the metrics this suite does not use."""
        keys = ("suite", "task", "length", "policy", "rate", "achieved_rate")
        metrics = ("score", "agreement", "kl")
        out = {k: getattr(self, k) for k in keys}
        out.update({k: getattr(self, k) for k in metrics if getattr(self, k) is not None})
        out["num_samples"] = self.num_samples
        return out


def format_cell(key: str, value: Any) -> str:
    """Text for one table cell of a row; precision chosen per column so the table stays
    narrow (for `kvcompress.report.format_table`)."""
    if isinstance(value, float):
        if key == "kl":
            return f"{value:.4f}"
        if key == "agreement":
            return f"{value:.3f}"
        if key == "rate":
            return f"{value:g}"
        if key == "achieved_rate":
            return f"{value:.2f}"
        return f"{value:.1f}"
    return str(value)


@dataclass(frozen=True)
class KeptGrid:
    """KVs kept per layer and KV head, one grid per policy, for one sample at one rate."""

    task: str
    length: int
    rate: float
    sample: int
    grids: dict[str, list[list[int]]]  # policy -> [layer][kv head]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class EvalResult:
    suite: str
    rows: list[Row]
    config: dict[str, Any]
    kept: KeptGrid | None = None
    seconds: float = 0.0
    # Per-sample outcomes keyed by (task, length, setting): predictions or metrics.
    samples: dict[tuple[str, int, Setting], list[Any]] = field(default_factory=dict)

    def document(self) -> dict[str, Any]:
        """The JSON document: configuration, rows and the kept-KV grids."""
        return {
            "suite": self.suite,
            "config": self.config,
            "seconds": round(self.seconds, 2),
            "rows": [row.as_dict() for row in self.rows],
            "kept_per_layer_head": self.kept.as_dict() if self.kept else None,
        }
