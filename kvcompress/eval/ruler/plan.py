"""What a task generator gives the length search: a plan that builds drafts of any size."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from kvcompress.eval.texts import CountTokens

__all__ = ["Budget", "Draft", "Plan", "PlanFn", "RulerConfig", "TaskSpec"]


@dataclass(frozen=True)
class RulerConfig:
    """Knobs for the synthetic tasks; the defaults suit small (~100M-parameter) models.

    `depth` places the (queried) needle at that fraction of the haystack, 0 = start and
    1 = end; None draws it per sample from the seed so a batch covers all depths.
    """

    haystack: Literal["repeat", "natural"] = "repeat"
    haystack_text: str | None = None  # for "natural"; None means `texts.pydoc_text()`
    depth: float | None = None
    value_digits: int = 5
    num_keys: int = 4  # needles in niah_multikey / niah_multiquery
    num_values: int = 4  # values of the one key in niah_multivalue
    num_queries: int = 2  # keys asked at once in niah_multiquery
    vt_chains: int = 1  # the queried chain plus vt_chains - 1 distractor chains
    vt_hops: int = 4  # X1 = value, X2 = X1, ...: hops + 1 names hold the value
    cwe_num_common: int = 10
    cwe_common_freq: int = 30  # upper bound; shorter targets use fewer repeats
    cwe_uncommon_freq: int = 3
    fwe_num_answers: int = 3
    fwe_alpha: float = 2.0  # Zipf exponent of the coded-word frequencies
    fwe_vocab: int = 500

    def __post_init__(self) -> None:
        if self.haystack not in ("repeat", "natural"):
            raise ValueError(f"haystack must be 'repeat' or 'natural', got {self.haystack!r}")
        if self.depth is not None and not 0.0 <= self.depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {self.depth}")
        if not 1 <= self.num_queries <= self.num_keys:
            raise ValueError("need 1 <= num_queries <= num_keys")
        if self.value_digits < 2 or self.vt_chains < 1 or self.vt_hops < 0:
            raise ValueError("value_digits >= 2, vt_chains >= 1 and vt_hops >= 0 required")
        if self.cwe_uncommon_freq < 1 or self.cwe_common_freq <= self.cwe_uncommon_freq:
            raise ValueError("need 1 <= cwe_uncommon_freq < cwe_common_freq")
        if not 1 <= self.fwe_num_answers < self.fwe_vocab:
            raise ValueError("need 1 <= fwe_num_answers < fwe_vocab")


class Draft(NamedTuple):
    """A task instance at one haystack size, before its length is accepted."""

    context: str
    question: str
    answers: list[str]
    meta: dict[str, Any]


class Plan(NamedTuple):
    """A task instance with every size-independent random choice already made.

    `build(n)` must be a pure function of `n` (it may reseed its own RNG from a fixed
    key) so that the length search can probe sizes in any order.
    """

    build: Callable[[int], Draft]
    min_units: int = 0


class Budget(NamedTuple):
    """The length target, for tasks whose fixed part must scale with it."""

    target: int
    count: CountTokens


PlanFn = Callable[[random.Random, RulerConfig, Budget], Plan]


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: how to plan it and how long its answer may be."""

    name: str
    category: Literal["retrieval", "tracing", "aggregation"]
    description: str
    max_new_tokens: int
    plan: PlanFn = field(repr=False)
