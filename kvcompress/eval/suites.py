"""The generation suites: RULER tasks and LongBench subsets at every point of a sweep.

Each suite builds one job per (sample, grid run), runs them all through `run_jobs` (which
prefills each prompt once for the runs that can share it, unless the sweep says not to),
and scores the answers per (task, length, policy, rate); see `sweep` for the runs a grid
needs. The natural-text suite, which teacher-forces instead of generating, is `fidelity`.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from kvcompress.eval.jobs import Job, make_progress, run_jobs
from kvcompress.eval.longbench import (
    SUBSETS,
    fit_example,
    format_prompt,
    load_longbench,
    score_longbench,
)
from kvcompress.eval.prompts import chat_overhead, encode_prompt
from kvcompress.eval.results import EvalResult, KeptGrid, Row
from kvcompress.eval.ruler import TASKS, generate_tasks
from kvcompress.eval.sweep import FULL, Setting, SweepConfig
from kvcompress.eval.texts import encode_ids

if TYPE_CHECKING:
    from kvcompress.engine import LLMEngine, RequestOutput

__all__ = ["LongBenchSpec", "RulerSpec", "run_longbench", "run_ruler"]


@dataclass(frozen=True)
class RulerSpec:
    """Which synthetic tasks to generate; `lengths` are whole-prompt token budgets."""

    tasks: tuple[str, ...] = ("niah_single", "niah_multikey")
    lengths: tuple[int, ...] = (1024,)
    num_samples: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown RULER task {unknown}; choose from {', '.join(TASKS)}")
        if not self.tasks or not self.lengths or self.num_samples < 1:
            raise ValueError("need at least one task, one length and one sample")
        if any(n < 64 for n in self.lengths):
            raise ValueError(f"lengths must be >= 64 tokens, got {self.lengths}")


@dataclass(frozen=True)
class LongBenchSpec:
    """LongBench JSONL files to read; prompts are cut in the middle to each length."""

    data_dir: str
    subsets: tuple[str, ...]
    lengths: tuple[int, ...] = (2048,)
    limit: int | None = 16

    def __post_init__(self) -> None:
        unknown = [s for s in self.subsets if s not in SUBSETS]
        if unknown:
            raise ValueError(
                f"unknown LongBench subset {unknown}; choose from {', '.join(SUBSETS)}"
            )
        if not self.subsets or not self.lengths:
            raise ValueError("need at least one subset and one length")


# --- Shared by both suites ----------------------------------------------------------------

Group = tuple[str, int]  # (task or subset, length)


class _Outcome(NamedTuple):
    """A finished request, reduced to what the rows and the heat map need."""

    index: int
    prediction: str
    rate: float  # achieved kvs_seen / kvs_kept
    kept: list[list[int]]


Outcomes = dict[tuple[str, int, Setting], list[_Outcome]]


def _execute(
    engine: LLMEngine, jobs: list[Job], sweep: SweepConfig, desc: str, progress: bool
) -> Outcomes:
    """Run jobs keyed (task, length, setting, index); outcomes sorted by sample index."""
    outcomes: Outcomes = defaultdict(list)

    def done(job: Job, out: RequestOutput) -> None:
        task, length, setting, index = job.key
        kv = out.kv
        rate = kv.kvs_seen / kv.kvs_kept if kv and kv.kvs_kept else 1.0
        kept = kv.kept_per_layer_head if kv else []
        outcomes[task, length, setting].append(_Outcome(index, out.text, rate, kept))

    bar = make_progress(len(jobs), desc, progress)
    try:
        run_jobs(engine, jobs, done, bar, sweep.shared_prefill)
    finally:
        bar.close()
    for results in outcomes.values():
        results.sort(key=lambda o: o.index)
    return dict(outcomes)


def _rows(
    suite: str,
    sweep: SweepConfig,
    groups: Sequence[Group],
    outcomes: Outcomes,
    score: Callable[[str, int, list[_Outcome]], float],
) -> list[Row]:
    rows: list[Row] = []
    for task, length in groups:
        for policy in sweep.policies:
            for rate in sweep.rates:
                done = outcomes.get((task, length, sweep.run_setting(policy, rate)), [])
                if not done:
                    continue
                achieved = sum(o.rate for o in done) / len(done)
                value = score(task, length, done)
                rows.append(Row(suite, task, length, policy, rate, achieved, len(done), value))
    return rows


def _kept_grid(sweep: SweepConfig, group: Group, outcomes: Outcomes) -> KeptGrid | None:
    """Grids of sample 0 of `group` at the heat-map rate, for every evicting policy."""
    rate = sweep.heatmap_rate()
    if rate is None:
        return None
    grids: dict[str, list[list[int]]] = {}
    for policy in sweep.policies:
        setting = sweep.run_setting(policy, rate)
        if setting == FULL:  # keeps everything: nothing to see, and it would set the scale
            continue
        done = outcomes.get((*group, setting), [])
        first = [o for o in done if o.index == 0]
        if first:
            grids[policy] = first[0].kept
    return KeptGrid(group[0], group[1], rate, 0, grids) if grids else None


def _result(
    suite: str,
    sweep: SweepConfig,
    spec: RulerSpec | LongBenchSpec,
    groups: list[Group],
    outcomes: Outcomes,
    score: Callable[[str, int, list[_Outcome]], float],
    start: float,
) -> EvalResult:
    rows = _rows(suite, sweep, groups, outcomes, score)
    config = {**dataclasses.asdict(spec), **sweep.to_dict()}
    # The first task at its longest prompt spreads the budget over the most KVs: the most
    # telling heat map.
    kept = _kept_grid(sweep, (groups[0][0], max(n for _, n in groups)), outcomes)
    predictions = {key: [o.prediction for o in done] for key, done in outcomes.items()}
    return EvalResult(suite, rows, config, kept, time.perf_counter() - start, predictions)


# --- RULER --------------------------------------------------------------------------------


def run_ruler(
    engine: LLMEngine, spec: RulerSpec, sweep: SweepConfig, progress: bool = True
) -> EvalResult:
    """Generate the synthetic tasks, run them at every grid point, score the answers."""
    start = time.perf_counter()
    tokenizer = engine.tokenizer
    # Lengths are budgets for what the model reads, chat template included.
    overhead = chat_overhead(tokenizer) if sweep.chat else 0

    def count(text: str) -> int:
        return len(encode_ids(tokenizer, text)) + overhead

    samples = generate_tasks(spec.tasks, spec.lengths, spec.num_samples, spec.seed, count)
    jobs: list[Job] = []
    by_key: dict[tuple[str, int, int], Any] = {}
    for sample in samples:
        index = sample.meta["index"]
        length = sample.meta["target_tokens"]
        by_key[sample.task, length, index] = sample
        ids = encode_prompt(tokenizer, sample.context, sample.question, sweep.chat, True)
        for setting in sweep.settings():
            key = (sample.task, length, setting, index)
            params = sweep.params(setting)
            jobs.append(Job(key, ids, sample.max_new_tokens, params, sweep.compress_context_only))
    outcomes = _execute(engine, jobs, sweep, "ruler", progress)

    def score(task: str, length: int, done: list[_Outcome]) -> float:
        total = sum(by_key[task, length, o.index].score(o.prediction) for o in done)
        return 100.0 * total / len(done)

    groups = [(t, n) for t in spec.tasks for n in spec.lengths]
    return _result("ruler", sweep, spec, groups, outcomes, score, start)


# --- LongBench ------------------------------------------------------------------------------


def run_longbench(
    engine: LLMEngine, spec: LongBenchSpec, sweep: SweepConfig, progress: bool = True
) -> EvalResult:
    """Score LongBench subsets from local JSONL files at every grid point."""
    start = time.perf_counter()
    tokenizer = engine.tokenizer
    data = {s: load_longbench(spec.data_dir, s, limit=spec.limit) for s in spec.subsets}
    empty = [s for s, examples in data.items() if not examples]
    if empty:
        raise ValueError(f"no examples in LongBench subset file(s): {', '.join(empty)}")
    jobs: list[Job] = []
    for subset, examples in data.items():
        chat = sweep.chat and SUBSETS[subset].chat
        overhead = chat_overhead(tokenizer) if chat else 0
        for length in spec.lengths:
            for index, example in enumerate(examples):
                fitted = fit_example(tokenizer, subset, example, length, overhead)
                prompt = format_prompt(subset, fitted)
                ids = encode_prompt(tokenizer, prompt.context, prompt.question, chat, False)
                for setting in sweep.settings():
                    key = (subset, length, setting, index)
                    budget = SUBSETS[subset].max_new_tokens
                    params = sweep.params(setting)
                    jobs.append(Job(key, ids, budget, params, sweep.compress_context_only))
    outcomes = _execute(engine, jobs, sweep, "longbench", progress)

    def score(subset: str, length: int, done: list[_Outcome]) -> float:
        examples = data[subset]
        return score_longbench(
            subset,
            [o.prediction for o in done],
            [examples[o.index].answers for o in done],
            examples[0].all_classes,
        )

    groups = [(s, n) for s in spec.subsets for n in spec.lengths]
    return _result("longbench", sweep, spec, groups, outcomes, score, start)
