"""Why an answer was lost: which tokens of chosen spans each (layer, KV head) kept.

For one prompt compressed with given parameters, :func:`explain` takes the engine's view
of what every head holds (:class:`kvcompress.compress.KeptKVs`, from
``LLMEngine.inspect_kept``) and some spans of the prompt (a fact such as ``1585963``, or
token ranges), and reports per head and span: how many of the span's tokens survived, their
metric ranks within the head, and the head's budget (KVs kept). ``kvcompress inspect``
prints it as a table and draws it beside the kept-KV heat map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import torch

from kvcompress.compress import CompressionParams, KeptKVs

__all__ = [
    "Explanation",
    "KeptSource",
    "Span",
    "explain",
    "explanation_rows",
    "spans_of_text",
    "tokens_overlapping",
]


class KeptSource(Protocol):
    """What the tool needs from an engine: compress one prompt alone and say what each head
    kept (``LLMEngine.inspect_kept``)."""

    def inspect_kept(
        self, prompt: list[int], compression: CompressionParams | dict[str, Any] | None
    ) -> KeptKVs: ...


class Span(NamedTuple):
    label: str
    positions: list[int]  # token indices of the prompt


class Explanation(NamedTuple):
    spans: list[Span]
    kept: KeptKVs
    held: torch.Tensor  # [L, H, num_spans] tokens of each span the head kept
    ranks: list[torch.Tensor]  # per span: [L, H, len(span)] metric rank, -1 where evicted

    @property
    def budgets(self) -> torch.Tensor:
        """``[L, H]`` KVs each head kept: the per-head budgets of the global selection."""
        return self.kept.kept


def tokens_overlapping(offsets: Sequence[tuple[int, int]], start: int, end: int) -> list[int]:
    """Indices of the tokens whose characters ``[a, b)`` overlap ``[start, end)``."""
    return [i for i, (a, b) in enumerate(offsets) if a < end and b > start and b > a]


def spans_of_text(text: str, offsets: Sequence[tuple[int, int]], needle: str) -> Span:
    """The tokens covering every occurrence of ``needle`` in ``text`` (empty if none)."""
    positions: set[int] = set()
    at = text.find(needle)
    while needle and at >= 0:
        positions.update(tokens_overlapping(offsets, at, at + len(needle)))
        at = text.find(needle, at + 1)
    return Span(needle, sorted(positions))


def explain(kept: KeptKVs, spans: Sequence[Span]) -> Explanation:
    """Per head and span: tokens kept and their metric ranks."""
    held, ranks = [], []
    for span in spans:
        positions = torch.tensor(span.positions, dtype=torch.long)
        held.append(kept.holds(positions).sum(dim=-1))
        ranks.append(kept.span_ranks(positions))
    L, H = kept.kept.shape
    stacked = torch.stack(held, dim=-1) if held else torch.zeros(L, H, 0, dtype=torch.long)
    return Explanation(list(spans), kept, stacked, ranks)


def explanation_rows(explanation: Explanation) -> list[dict[str, Any]]:
    """One row per (layer, head): its budget, then per span ``kept/len`` and the ranks."""
    L, H = explanation.budgets.shape
    rows = []
    for layer in range(L):
        for head in range(H):
            row: dict[str, Any] = {
                "layer": layer,
                "head": head,
                "kept": int(explanation.budgets[layer, head]),
            }
            for s, span in enumerate(explanation.spans):
                n = int(explanation.held[layer, head, s])
                ranks = explanation.ranks[s][layer, head].tolist()
                row[f"{span.label} kept"] = f"{n}/{len(span.positions)}"
                row[f"{span.label} ranks"] = " ".join("-" if r < 0 else str(r) for r in ranks)
            rows.append(row)
    return rows
