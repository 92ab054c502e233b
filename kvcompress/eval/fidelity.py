"""Natural-text fidelity: how far a compressed cache moves the next-token distribution.

For each of K windows of real text, the first P tokens are prefilled and compressed
once per (policy, rate), then the true next C tokens are teacher-forced one decode step
at a time (`LLMEngine.teacher_force`). Each compressed run is compared with the
uncompressed run of the same window: top-1 agreement (the fraction of positions where
both pick the same next token) and the mean KL(full || compressed) in nats.

Unlike generation scores this needs no task the model can solve, so it is a stable
signal even for a small model: full agrees with itself exactly (1.0, KL 0), and a policy
that drops the wrong KVs shows up as lost agreement at a handful of windows.

As in the generation suites, ``full`` runs once per window and every policy's rate-1
row is that run (nothing is evicted at rate 1), reported as agreement 1 and KL 0.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from kvcompress.eval.jobs import make_progress
from kvcompress.eval.results import EvalResult, KeptGrid, Row
from kvcompress.eval.scoring import mean_kl, top1_agreement
from kvcompress.eval.sweep import FULL, Setting, SweepConfig
from kvcompress.eval.texts import pydoc_text

if TYPE_CHECKING:
    from kvcompress.engine import LLMEngine, TeacherForceResult

__all__ = ["FidelitySpec", "Window", "run_fidelity", "token_windows"]


@dataclass(frozen=True)
class FidelitySpec:
    """Where the text comes from and how it is cut into windows.

    `text` None means CPython's bundled documentation (`texts.pydoc_text`), the same on
    every machine; `source` names the text in the report's task column.
    """

    text: str | None = None
    source: str = "pydoc"
    prefix_len: int = 2048
    continuation_len: int = 64
    num_windows: int = 2

    def __post_init__(self) -> None:
        if self.prefix_len < 1 or self.continuation_len < 2 or self.num_windows < 1:
            raise ValueError(
                "need prefix_len >= 1, continuation_len >= 2 and num_windows >= 1, got "
                f"{self.prefix_len}, {self.continuation_len}, {self.num_windows}"
            )


class Window(NamedTuple):
    prefix: list[int]
    continuation: list[int]


def token_windows(
    ids: list[int], prefix_len: int, continuation_len: int, count: int
) -> list[Window]:
    """`count` windows of prefix + continuation tokens, spread evenly over `ids`.

    Windows start at evenly spaced offsets from the first token to the last one that
    still fits, so they sample the whole text rather than its opening pages.
    """
    size = prefix_len + continuation_len
    if len(ids) < size:
        raise ValueError(
            f"the text has {len(ids)} tokens; one window needs {size} "
            f"(prefix {prefix_len} + continuation {continuation_len})"
        )
    span = len(ids) - size
    starts = [span * k // max(count - 1, 1) for k in range(count)] if count > 1 else [0]
    return [Window(ids[s : s + prefix_len], ids[s + prefix_len : s + size]) for s in starts]


class _Measure(NamedTuple):
    agreement: float
    kl: float
    rate: float  # achieved kvs_seen / kvs_kept at the end of the window
    kept: list[list[int]]


def _tokenize(engine: LLMEngine, text: str) -> list[int]:
    # verbose=False: the text is far longer than the model's context, which is fine here
    # (only windows are fed), so the tokenizer's length warning would only be noise.
    return list(engine.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def run_fidelity(
    engine: LLMEngine, spec: FidelitySpec, sweep: SweepConfig, progress: bool = True
) -> EvalResult:
    """Top-1 agreement and KL against the full cache for every grid point."""
    start = time.perf_counter()
    text = spec.text if spec.text is not None else pydoc_text()
    windows = token_windows(
        _tokenize(engine, text), spec.prefix_len, spec.continuation_len, spec.num_windows
    )
    settings = [s for s in sweep.settings() if s != FULL]
    measures: dict[Setting, list[_Measure]] = defaultdict(list)
    bar = make_progress(len(windows) * (len(settings) + 1), "fidelity", progress)
    try:
        for window in windows:
            reference = _force(engine, window, sweep, FULL).logits
            bar.update(1)
            for setting in settings:
                logits, stats = _force(engine, window, sweep, setting)
                measures[setting].append(
                    _Measure(
                        top1_agreement(reference, logits),
                        mean_kl(reference, logits),
                        stats.compression_rate,
                        stats.kept_per_layer_head,
                    )
                )
                bar.update(1)
    finally:
        bar.close()
    rows = _rows(spec, sweep, measures, len(windows))
    config = {
        "source": spec.source,
        "prefix_len": spec.prefix_len,
        "continuation_len": spec.continuation_len,
        "num_windows": spec.num_windows,
        **sweep.to_dict(),
    }
    samples: dict[tuple[str, int, Setting], list[Any]] = {
        (spec.source, spec.prefix_len, s): [m._asdict() for m in ms] for s, ms in measures.items()
    }
    return EvalResult(
        "fidelity",
        rows,
        config,
        _kept(spec, sweep, measures),
        time.perf_counter() - start,
        samples,
    )


def _force(
    engine: LLMEngine, window: Window, sweep: SweepConfig, setting: Setting
) -> TeacherForceResult:
    return engine.teacher_force(window.prefix, window.continuation, sweep.params(setting))


def _rows(
    spec: FidelitySpec, sweep: SweepConfig, measures: dict[Setting, list[_Measure]], count: int
) -> list[Row]:
    rows: list[Row] = []
    for policy in sweep.policies:
        for rate in sweep.rates:
            setting = sweep.run_setting(policy, rate)
            done = measures.get(setting)
            if setting == FULL or not done:
                # The reference itself: exact agreement, no divergence, nothing evicted.
                agreement, kl, achieved = 1.0, 0.0, 1.0
            else:
                agreement = sum(m.agreement for m in done) / len(done)
                kl = sum(m.kl for m in done) / len(done)
                achieved = sum(m.rate for m in done) / len(done)
            row = Row("fidelity", spec.source, spec.prefix_len, policy, rate, achieved, count)
            rows.append(dataclasses.replace(row, agreement=agreement, kl=kl))
    return rows


def _kept(spec: FidelitySpec, sweep: SweepConfig, measures: dict[Setting, list[_Measure]]):
    rate = sweep.heatmap_rate()
    if rate is None:
        return None
    grids = {
        policy: measures[setting][0].kept
        for policy in sweep.policies
        if (setting := sweep.run_setting(policy, rate)) in measures
    }
    return KeptGrid(spec.source, spec.prefix_len, rate, 0, grids) if grids else None
