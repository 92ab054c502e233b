"""Per-request compression parameters: the one schema every floor derives its options from.

``CompressionParams`` is the single source of the compression fields: their names, types,
defaults and help. The command line (``--compression-rate`` ...), the server's request fields,
and the benchmark and evaluation sweeps are all built from :func:`compression_fields`, so a
field or default added here appears everywhere at once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NamedTuple

from kvcompress.compress.metrics import (
    METRIC_SETTINGS,
    METRICS,
    MetricConfig,
    check_metric_setting,
    metric_power,
)
from kvcompress.compress.scorers import SCORERS
from kvcompress.errors import InvalidParameterError

Allocation = Literal["global", "per_head", "pyramid", "none"]
Score = Literal["metric", "position", "random"]


class Policy(NamedTuple):
    """How a policy scores KVs and how it shares a sequence's budget among its heads."""

    name: str
    score: Score
    allocation: Allocation
    metric: str | None  # forces a metric variant; None: the request's own

    @property
    def fixed_scorer(self) -> str | None:
        """The scorer that defines this policy (streaming: position, random: random), which
        a request's ``scorer`` cannot change; None for the attention-scored policies."""
        return None if self.score == "metric" else self.score


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


# The two ways to give a budget; they exclude each other, so giving one clears the other.
BUDGET_FIELDS = ("compression_rate", "max_cache_tokens")


class PrefillSignature(NamedTuple):
    """What a prefill must collect for a request's first compression: the metric's power
    (1: L1, 2: L2) and the request's metric settings (``METRIC_SETTINGS``, by name, as the
    request gives them: None is the engine's). Requests with equal signatures can be
    compressed from one shared prefill."""

    metric_power: int
    collection: tuple[tuple[str, Any], ...] = ()

    def __str__(self) -> str:
        settings = "".join(f", {name}={value!r}" for name, value in self.collection)
        return f"the L{self.metric_power} metric{settings}"


# The engine's defaults, quoted in the help of the settings a request may override.
_ENGINE_METRIC = MetricConfig()


def _doc(help: str, choices: tuple[str, ...] | None = None) -> dict[str, Any]:
    return {"help": help, "choices": choices}


@dataclass(frozen=True)
class CompressionParams:
    """What one request asks of compression.

    Give at most one of ``compression_rate`` (c >= 1: keep about 1/c of the non-protected
    KVs seen) and ``max_cache_tokens`` (average KVs kept per head, shared across all heads and
    layers). With neither, nothing is evicted.

    Like pydantic's ``model_fields_set``, ``fields_set`` records the fields the caller gave,
    so that ``defaults.with_overrides(params)`` applies only those over the defaults.
    """

    policy: str = field(
        default="kvcompress",
        metadata=_doc("eviction policy (full: no eviction)", tuple(POLICIES)),
    )
    compression_rate: float | None = field(
        default=None, metadata=_doc("keep about 1/C of the non-protected KVs (C >= 1)")
    )
    max_cache_tokens: int | None = field(
        default=None, metadata=_doc("average KVs kept per head, shared by all heads and layers")
    )
    min_cache_tokens: int = field(
        default=128,
        metadata=_doc(
            "a rate never compresses a sequence below this many KVs per head on average "
            "(short prompts stay whole); max_cache_tokens is not raised by it"
        ),
    )
    protected_window: int = field(
        default=32, metadata=_doc("the most recent tokens, never evicted")
    )
    sinks: int = field(default=0, metadata=_doc("the first tokens, never evicted"))
    # 0 keeps the paper's selection: a floor trades natural-text fidelity for multi-key
    # retrieval at high rates (docs/quality.md, "A layer floor").
    layer_floor: float = field(
        default=0.0,
        metadata=_doc(
            "kvcompress: the share (0..1) of the sequence's budget that every layer keeps "
            "in equal parts, its heads competing for it, before the global selection spends "
            "the rest (0: one global selection, the paper's; 1: a budget per layer)"
        ),
    )
    metric: str = field(default="l2-sum", metadata=_doc("eviction metric", METRICS))
    # How the metric is collected; None: the engine's MetricConfig (metric_settings).
    window_size: int | None = field(
        default=None,
        metadata=_doc(
            "observation window: the last queries of each prefill chunk, whose attention "
            f"sets the metric (none: the engine's, {_ENGINE_METRIC.window_size} by default)"
        ),
    )
    pool_kernel: int | None = field(
        default=None,
        metadata=_doc(
            "max-pool width along key positions of the attention scores (window metric, "
            "last-query, expected-attention), odd; wider keeps "
            "multi-token facts whole, 1: no pooling (none: the engine's, "
            f"{_ENGINE_METRIC.pool_kernel} by default)"
        ),
    )
    pool_spans: bool | None = field(
        default=None,
        metadata=_doc(
            "after the max-pool along positions, each KV takes the maximum over its span: a "
            "word, or a number however many tokens it takes (window metric, last-query, "
            "expected-attention); keeps facts whole with a narrower pool_kernel (none: the "
            f"engine's, {_ENGINE_METRIC.pool_spans} by default)"
        ),
    )
    collection_buffer: int | None = field(
        default=None,
        metadata=_doc(
            "query-key pairs closer than this many positions add nothing to the metric "
            f"(none: the engine's, {_ENGINE_METRIC.collection_buffer} by default)"
        ),
    )
    scorer: str = field(
        default="window",
        metadata=_doc(
            "how KVs are scored for the planner (window: the accumulated attention metric; "
            "key-norm: reads no query; expected-attention: the expected attention of the "
            "queries to come, from the prompt's last window; both for a context compressed "
            "before its question; last-query: the newest token's attention, TOVA; "
            "streaming and random keep their own)",
            tuple(SCORERS),
        ),
    )
    compress_once: bool = field(
        default=False, metadata=_doc("compress only once, right after the prefill")
    )
    compression_interval: int | None = field(
        default=None, metadata=_doc("decode steps between compressions (none: only on demand)")
    )
    # Not a dataclass field: set per instance by __init__ and with_overrides.
    fields_set: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        def bad(name: str, message: str) -> InvalidParameterError:
            return InvalidParameterError(message, param=name)

        if self.policy not in POLICIES:
            raise bad(
                "policy", f"unknown policy {self.policy!r}; choose from {', '.join(POLICIES)}"
            )
        if self.compression_rate is not None and self.max_cache_tokens is not None:
            raise bad("compression_rate", "give compression_rate or max_cache_tokens, not both")
        if self.compression_rate is not None and not (
            _is_number(self.compression_rate) and self.compression_rate >= 1
        ):
            raise bad(
                "compression_rate",
                f"compression_rate must be a number >= 1, got {self.compression_rate!r}",
            )
        for name, low in (("max_cache_tokens", 1), ("compression_interval", 1)):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < low):
                raise bad(name, f"{name} must be an integer >= {low}, got {value!r}")
        for name in ("min_cache_tokens", "protected_window", "sinks"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise bad(name, f"{name} must be an integer >= 0, got {value!r}")
        if not (_is_number(self.layer_floor) and 0 <= self.layer_floor <= 1):
            raise bad(
                "layer_floor", f"layer_floor must be a number from 0 to 1, got {self.layer_floor!r}"
            )
        if self.metric not in METRICS:
            raise bad("metric", f"unknown metric {self.metric!r}; choose from {', '.join(METRICS)}")
        for name in METRIC_SETTINGS:
            if getattr(self, name) is not None:
                check_metric_setting(name, getattr(self, name))
        if self.scorer not in SCORERS:
            raise bad("scorer", f"unknown scorer {self.scorer!r}; choose from {', '.join(SCORERS)}")
        if not isinstance(self.compress_once, bool):
            raise bad(
                "compress_once", f"compress_once must be a boolean, got {self.compress_once!r}"
            )

    def with_overrides(
        self, overrides: CompressionParams | Mapping[str, Any] | None = None, /, **fields: Any
    ) -> CompressionParams:
        """These parameters with some fields replaced.

        ``overrides`` is another ``CompressionParams`` (only its ``fields_set`` apply) or a
        mapping; keyword arguments apply last. A field that is not given keeps its value here;
        a field given as ``None`` is cleared, which only nullable fields allow
        (``compression_interval=None`` turns off periodic compression). Giving one budget
        (``compression_rate`` or ``max_cache_tokens``) clears the other.
        """
        given: dict[str, Any] = {}
        if isinstance(overrides, CompressionParams):
            given.update({name: getattr(overrides, name) for name in overrides.fields_set})
        elif overrides is not None:
            given.update(overrides)
        given.update(fields)
        specs = {spec.name: spec for spec in compression_fields()}
        unknown = sorted(set(given) - set(specs))
        if unknown:
            raise InvalidParameterError(
                f"unknown compression field(s): {', '.join(unknown)}; known: {', '.join(specs)}",
                param=unknown[0],
            )
        for name, value in given.items():
            if value is None and not specs[name].nullable:
                raise InvalidParameterError(f"{name} cannot be null", param=name)
        for name, other in (BUDGET_FIELDS, BUDGET_FIELDS[::-1]):
            if given.get(name) is not None and other not in given:
                given[other] = None
        values = {name: getattr(self, name) for name in specs} | given
        merged = CompressionParams(**values)
        object.__setattr__(merged, "fields_set", self.fields_set | given.keys())
        return merged

    def to_dict(self) -> dict[str, Any]:
        """Every field by name (for JSON reports)."""
        return {spec.name: getattr(self, spec.name) for spec in compression_fields()}

    @property
    def policy_spec(self) -> Policy:
        return POLICIES[self.policy]

    @property
    def effective_metric(self) -> str:
        return self.policy_spec.metric or self.metric

    @property
    def effective_scorer(self) -> str:
        """The scorer that ranks this request's KVs.

        The rule: ``scorer`` applies to the policies that rank by attention (kvcompress,
        uniform, pyramid, h2o: their allocation stays, only the score changes); streaming
        and random ARE their score (position, random) and keep it whatever ``scorer`` says.
        """
        return self.policy_spec.fixed_scorer or self.scorer

    @property
    def uses_metric(self) -> bool:
        """Whether the engine must accumulate the attention metric for this request."""
        return SCORERS[self.effective_scorer].uses_metric

    @property
    def scorer_requires(self) -> tuple[str, ...]:
        """The ``ScorerInputs`` fields this request's scorer cannot run without."""
        return SCORERS[self.effective_scorer].requires

    def metric_settings(self, engine: MetricConfig) -> MetricConfig:
        """How this request's metric is collected: its own settings where it gives them,
        the engine's ``MetricConfig`` for the others."""
        given = {n: getattr(self, n) for n in METRIC_SETTINGS if getattr(self, n) is not None}
        # The usual request gives none: the engine's object itself, nothing built per step.
        return dataclasses.replace(engine, **given) if given else engine

    def pools_spans_at_compression(self, engine: MetricConfig) -> bool:
        """Whether this request's scorer pools attention it computes at compression over
        spans (``last-query``, ``expected-attention`` with ``pool_spans``): the compressor
        then needs ``ScorerInputs.spans``."""
        return (
            self.evicts
            and SCORERS[self.effective_scorer].pooled
            and self.metric_settings(engine).pool_spans
        )

    @property
    def power(self) -> int:
        """Exponent applied to attention probabilities when accumulating the metric."""
        return metric_power(self.effective_metric)

    def prefill_signature(self) -> PrefillSignature | None:
        """What the prefill must collect for this request's first compression; None when
        that compression reads nothing the prefill collects (no eviction, or a score by
        position or at random), so that any prefill serves it."""
        if not (self.evicts and self.uses_metric):
            return None
        collection = tuple((name, getattr(self, name)) for name in METRIC_SETTINGS)
        return PrefillSignature(self.power, collection)

    @property
    def evicts(self) -> bool:
        if self.policy_spec.allocation == "none":
            return False
        if self.max_cache_tokens is not None:
            return True
        return self.compression_rate is not None and self.compression_rate > 1


def shared_prefill_signature(
    params: Iterable[CompressionParams],
) -> PrefillSignature | None:
    """The one prefill signature that serves every request of ``params`` (None when none
    reads the metric); raises ``InvalidParameterError`` when two of them need different
    prefills."""
    found: dict[PrefillSignature, str] = {}
    for p in params:
        signature = p.prefill_signature()
        if signature is not None:
            found.setdefault(signature, p.policy)
    if len(found) > 1:
        needs = "; ".join(f"{policy} needs {sig}" for sig, policy in found.items())
        raise InvalidParameterError(
            f"these compression parameters cannot share one prefill: {needs}",
            param="compression",
        )
    return next(iter(found), None)


def exact_rates(**fields: Any) -> CompressionParams:
    """The base parameters of a rate sweep (benchmarks, evaluation): no ``min_cache_tokens``
    floor, so that rate C keeps about 1/C of the KVs at every prompt length and the rows
    are labelled truly (the floor would make rate 64 on a 1k-token prompt keep what rate 8
    keeps)."""
    return CompressionParams(min_cache_tokens=0, **fields)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite int or float (a bool is neither here)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _record_fields_set(init):
    names = [f.name for f in dataclasses.fields(CompressionParams)]

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        object.__setattr__(self, "fields_set", frozenset(names[: len(args)]) | kwargs.keys())

    return __init__


CompressionParams.__init__ = _record_fields_set(CompressionParams.__init__)  # type: ignore[method-assign]


class ParamField(NamedTuple):
    """One compression field as the outer floors see it."""

    name: str
    type: type  # int, float, str or bool
    default: Any
    nullable: bool
    help: str
    choices: tuple[str, ...] | None

    def parse(self, text: str) -> Any:
        """This field's value written as text (command lines, eval variants): ``none`` is a
        nullable field's None, a bool is true/false, on/off, yes/no or 1/0. The value's
        range is checked by :class:`CompressionParams`, not here."""
        lowered = text.strip().lower()
        if self.nullable and lowered == "none":
            return None
        if self.type is bool:
            if lowered in _TRUE or lowered in _FALSE:
                return lowered in _TRUE
        else:
            try:
                return self.type(text)
            except ValueError:
                pass
        raise ValueError(f"{self.name} takes {self.type.__name__} values, got {text!r}")


_TRUE, _FALSE = ("true", "on", "yes", "1"), ("false", "off", "no", "0")


@functools.cache
def compression_fields() -> tuple[ParamField, ...]:
    """The fields of :class:`CompressionParams`, in order, with their types and help."""
    hints = typing.get_type_hints(CompressionParams)
    out = []
    for f in dataclasses.fields(CompressionParams):
        args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)]
        base = args[0] if args else hints[f.name]
        nullable = type(None) in typing.get_args(hints[f.name])
        out.append(
            ParamField(f.name, base, f.default, nullable, f.metadata["help"], f.metadata["choices"])
        )
    return tuple(out)
