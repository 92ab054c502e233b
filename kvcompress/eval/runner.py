"""Sweeps of compression policies x rates over RULER and LongBench prompts, in our engine.

Every (policy, rate) point runs in the same engine, so every policy keeps the same number
of KVs at a given rate (the engine derives one block budget per rate, whatever the
policy). Two shortcuts save most of the work on a CPU, and are exact rather than
approximations:

- ``full`` ignores the rate: it runs once per sample and its result is reported as the
  ``full`` row at every requested rate (the reference line of the plots);
- at rate 1 no policy evicts anything (`CompressionParams.evicts` is False), so every
  policy's rate-1 row is that same uncompressed run.

Prompts are split into a context part and a question part. By default both are
prefilled together, so the eviction metric's observation window sees the question
(query-aware compression, as in the paper). With ``compress_context_only`` the question
is passed as the request's ``suffix``: the engine compresses the context first and only
then feeds the question, the harder setting where the cache cannot know what will be
asked. The token ids are the same in both modes; only the moment of compression differs.

Requests are submitted together and the engine batches them, but no more at once than
the KV cache holds uncompressed (prompt + suffix + generation budget): the engine would
otherwise relieve memory pressure by compressing again mid-decode, or by preemption, and
the sweep would measure the scheduler instead of the policy.
"""

from __future__ import annotations

import dataclasses
import sys
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from kvcompress.compress import POLICIES, CompressionParams
from kvcompress.eval.longbench import (
    SUBSETS,
    LongBenchExample,
    format_prompt,
    load_longbench,
    score_longbench,
)
from kvcompress.eval.ruler import TASKS, generate_tasks
from kvcompress.eval.texts import encode_ids

if TYPE_CHECKING:
    from kvcompress.engine import LLMEngine, RequestOutput

__all__ = [
    "DEFAULT_POLICIES",
    "DEFAULT_RATES",
    "EvalResult",
    "Job",
    "KeptGrid",
    "LongBenchSpec",
    "PromptIds",
    "Row",
    "RulerSpec",
    "SweepConfig",
    "encode_prompt",
    "run_jobs",
    "run_longbench",
    "run_ruler",
    "split_answer_prefix",
]

# Full first: it is the reference every other policy is compared with.
DEFAULT_POLICIES: tuple[str, ...] = (
    "full",
    "kvcompress",
    "uniform",
    "pyramid",
    "streaming",
    "h2o",
    "random",
)
DEFAULT_RATES: tuple[float, ...] = (1, 4, 16)

# LongBench prompts its few-shot and code-completion subsets without the chat template
# (their prompts are continuations, not instructions); `run_longbench` follows suit.
LONGBENCH_NO_CHAT: frozenset[str] = frozenset({"trec", "triviaqa", "samsum", "lcc", "repobench-p"})


# --- Configuration ----------------------------------------------------------------------


@dataclass(frozen=True)
class SweepConfig:
    """The policy x rate grid and how each request is compressed."""

    policies: tuple[str, ...] = DEFAULT_POLICIES
    rates: tuple[float, ...] = DEFAULT_RATES
    protected_window: int = 32
    compress_context_only: bool = False
    chat: bool = False

    def __post_init__(self) -> None:
        unknown = [p for p in self.policies if p not in POLICIES]
        if unknown:
            raise ValueError(f"unknown policy {unknown}; choose from {', '.join(POLICIES)}")
        if not self.policies:
            raise ValueError("no policies to evaluate")
        if not self.rates or any(not r >= 1 for r in self.rates):
            raise ValueError(f"compression rates must be numbers >= 1, got {self.rates}")
        if self.protected_window < 0:
            raise ValueError(f"protected_window must be >= 0, got {self.protected_window}")

    def run_setting(self, policy: str, rate: float) -> Setting:
        """The run whose result stands for (policy, rate): see the module docstring."""
        if policy == "full" or rate <= 1:
            return FULL
        return Setting(policy, rate)

    def settings(self) -> list[Setting]:
        """Distinct runs the grid needs, the uncompressed reference first."""
        runs = {self.run_setting(p, r): None for p in self.policies for r in self.rates}
        return sorted(runs, key=lambda s: s != FULL)

    def compression(self, setting: Setting) -> CompressionParams:
        if setting == FULL:
            return CompressionParams(policy="full", protected_window=self.protected_window)
        return CompressionParams(
            policy=setting.policy,
            compression_rate=float(setting.rate),
            protected_window=self.protected_window,
        )

    def heatmap_rate(self) -> float | None:
        """The rate whose kept-KV grids are kept for the heat map: the highest one."""
        evicting = [r for r in self.rates if r > 1]
        return max(evicting) if evicting else None


class Setting(NamedTuple):
    """One engine run of the grid: a policy at a requested rate."""

    policy: str
    rate: float


FULL = Setting("full", 1)


@dataclass(frozen=True)
class RulerSpec:
    """Which synthetic tasks to generate; `lengths` are whole-prompt token budgets."""

    tasks: tuple[str, ...] = ("niah_single", "vt")
    lengths: tuple[int, ...] = (1024, 2048)
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


# --- Results ----------------------------------------------------------------------------


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


# --- Prompts ----------------------------------------------------------------------------


class PromptIds(NamedTuple):
    """A prompt as token ids: `context` is always prefilled; `question` follows it."""

    context: list[int]
    question: list[int]


def split_answer_prefix(question: str) -> tuple[str, str]:
    """Split a RULER question into the query and the answer prefix that follows it.

    RULER questions end with the start of the answer ("What is the pass key? The pass
    key is"), which steers a base model. An instruct model is asked the query as the
    user and gets the prefix after its assistant header instead, so that the answer it
    writes continues the prefix. A question with no "? " has no prefix.
    """
    at = question.rfind("? ")
    if at < 0:
        return question, ""
    prefix = question[at + 2 :]
    prefix = prefix.removeprefix("Answer:").lstrip()
    return question[: at + 1], prefix


def encode_prompt(
    tokenizer: Any, context: str, question: str, chat: bool, answer_prefix: bool
) -> PromptIds:
    """Token ids for `context` then `question`, raw or wrapped in the chat template.

    With `chat`, the user message is context + query and the template's assistant
    header follows; with `answer_prefix` the question's answer prefix comes after that
    header (see `split_answer_prefix`). The rendered template is cut where the query
    starts, so the context part ends exactly where the raw context would.
    """
    if not chat:
        ctx = list(tokenizer(context, add_special_tokens=True)["input_ids"])
        return PromptIds(ctx, encode_ids(tokenizer, question))
    query, prefix = split_answer_prefix(question) if answer_prefix else (question, "")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; use --no-chat")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": context + query}], tokenize=False, add_generation_prompt=True
    )
    # Templates may strip the message, so look for the query without its leading space.
    at = rendered.rfind(query.strip()) if query.strip() else -1
    if at < 0:
        raise ValueError("could not locate the question inside the rendered chat template")
    head, tail = rendered[:at], rendered[at:] + prefix
    return PromptIds(encode_ids(tokenizer, head), encode_ids(tokenizer, tail))


def chat_overhead(tokenizer: Any) -> int:
    """Tokens the chat template adds around a user message (to keep lengths honest)."""
    empty = tokenizer.apply_chat_template(
        [{"role": "user", "content": ""}], tokenize=False, add_generation_prompt=True
    )
    return len(encode_ids(tokenizer, empty))


# --- Running requests ---------------------------------------------------------------------


class Job(NamedTuple):
    """One generation request; `key` routes its output back to the caller."""

    key: Any
    prompt: PromptIds
    max_new_tokens: int
    compression: CompressionParams
    compress_context_only: bool


# Inference mode: nothing here needs autograd, and the engine's compressor reuses
# workspace buffers that `teacher_force` (itself in inference mode) may have created;
# such inference tensors cannot be updated in place outside inference mode.
@torch.inference_mode()
def run_jobs(
    engine: LLMEngine,
    jobs: Iterable[Job],
    on_done: Callable[[Job, RequestOutput], None],
    progress: Any = None,
) -> None:
    """Run every job through the engine, batched, and hand each finished output back.

    Jobs are admitted while their uncompressed worst case fits in the cache (see the
    module docstring); outputs come back in completion order.
    """
    from kvcompress.engine import SamplingParams

    pending = deque(jobs)
    in_flight: dict[str, tuple[Job, int]] = {}
    used = 0
    capacity = engine.capacity()
    while pending or in_flight:
        while pending and len(in_flight) < capacity.max_num_seqs:
            job = pending[0]
            total = len(job.prompt.context) + len(job.prompt.question) + job.max_new_tokens
            need = capacity.blocks_for(total)
            if in_flight and used + need > capacity.num_blocks:
                break
            pending.popleft()
            if job.compress_context_only:
                prompt, suffix = job.prompt.context, job.prompt.question
            else:
                prompt, suffix = job.prompt.context + job.prompt.question, None
            sampling = SamplingParams(max_tokens=job.max_new_tokens, temperature=0.0)
            request_id = engine.add_request(prompt, sampling, job.compression, suffix=suffix)
            in_flight[request_id] = (job, need)
            used += need
        for out in engine.step():
            if out.finished and out.request_id in in_flight:
                job, need = in_flight.pop(out.request_id)
                used -= need
                on_done(job, out)
                if progress is not None:
                    progress.update(1)


def make_progress(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar on stderr (never stdout, which may carry the JSON document)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=not enabled, unit="req")


class _Outcome(NamedTuple):
    """A finished request, reduced to what the rows and the heat map need."""

    index: int
    prediction: str
    rate: float  # achieved kvs_seen / kvs_kept
    kept: list[list[int]]


def _collect_rows(
    suite: str,
    sweep: SweepConfig,
    groups: Sequence[tuple[str, int]],
    outcomes: dict[tuple[str, int, Setting], list[_Outcome]],
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


def _kept_grid(
    sweep: SweepConfig,
    group: tuple[str, int],
    outcomes: dict[tuple[str, int, Setting], list[_Outcome]],
) -> KeptGrid | None:
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


def _execute(
    engine: LLMEngine,
    jobs: list[Job],
    desc: str,
    progress: bool,
) -> dict[tuple[str, int, Setting], list[_Outcome]]:
    """Run jobs keyed (task, length, setting, index); outcomes sorted by sample index."""
    outcomes: dict[tuple[str, int, Setting], list[_Outcome]] = defaultdict(list)

    def done(job: Job, out: RequestOutput) -> None:
        task, length, setting, index = job.key
        kv = out.kv
        rate = kv.kvs_seen / kv.kvs_kept if kv and kv.kvs_kept else 1.0
        kept = kv.kept_per_layer_head if kv else []
        outcomes[task, length, setting].append(_Outcome(index, out.text, rate, kept))

    bar = make_progress(len(jobs), desc, progress)
    try:
        run_jobs(engine, jobs, done, bar)
    finally:
        bar.close()
    for results in outcomes.values():
        results.sort(key=lambda o: o.index)
    return dict(outcomes)


# --- RULER --------------------------------------------------------------------------------


def run_ruler(
    engine: LLMEngine, spec: RulerSpec, sweep: SweepConfig, progress: bool = True
) -> EvalResult:
    """Generate the synthetic tasks, run them at every grid point, score the answers."""
    import time

    start = time.perf_counter()
    tokenizer = engine.tokenizer
    # Lengths are budgets for what the model reads, chat template included.
    overhead = chat_overhead(tokenizer) if sweep.chat else 0

    def count(text: str) -> int:
        return len(encode_ids(tokenizer, text)) + overhead

    samples = generate_tasks(spec.tasks, spec.lengths, spec.num_samples, spec.seed, count)
    settings = sweep.settings()
    jobs: list[Job] = []
    by_key: dict[tuple[str, int, int], Any] = {}
    for sample in samples:
        index = sample.meta["index"]
        length = sample.meta["target_tokens"]
        by_key[sample.task, length, index] = sample
        ids = encode_prompt(tokenizer, sample.context, sample.question, sweep.chat, True)
        for setting in settings:
            jobs.append(
                Job(
                    (sample.task, length, setting, index),
                    ids,
                    sample.max_new_tokens,
                    sweep.compression(setting),
                    sweep.compress_context_only,
                )
            )
    outcomes = _execute(engine, jobs, "ruler", progress)

    def score(task: str, length: int, done: list[_Outcome]) -> float:
        total = sum(by_key[task, length, o.index].score(o.prediction) for o in done)
        return 100.0 * total / len(done)

    groups = [(t, n) for t in spec.tasks for n in spec.lengths]
    rows = _collect_rows("ruler", sweep, groups, outcomes, score)
    config = {**dataclasses.asdict(spec), **_sweep_config(sweep)}
    # The longest prompt spreads the budget over the most KVs: the most telling heat map.
    kept = _kept_grid(sweep, (spec.tasks[0], max(spec.lengths)), outcomes)
    return EvalResult(
        "ruler", rows, config, kept, time.perf_counter() - start, _predictions(outcomes)
    )


def _predictions(
    outcomes: dict[tuple[str, int, Setting], list[_Outcome]],
) -> dict[tuple[str, int, Setting], list[Any]]:
    return {key: [o.prediction for o in done] for key, done in outcomes.items()}


def _sweep_config(sweep: SweepConfig) -> dict[str, Any]:
    return {
        "policies": list(sweep.policies),
        "rates": list(sweep.rates),
        "protected_window": sweep.protected_window,
        "compress_context_only": sweep.compress_context_only,
        "chat": sweep.chat,
    }


# --- LongBench ------------------------------------------------------------------------------


def _fit_example(
    tokenizer: Any, subset: str, example: LongBenchExample, length: int, overhead: int
) -> LongBenchExample:
    """The example with its context cut in the middle so the whole prompt fits `length`.

    LongBench's own convention (instructions sit at both ends of the prompt); the few
    tokens of slack cover re-tokenisation at the cut.
    """
    from kvcompress.eval.longbench import truncate_middle

    empty = format_prompt(subset, dataclasses.replace(example, context=""))
    fixed = len(encode_ids(tokenizer, empty.text)) + overhead + 8
    budget = length - fixed
    if budget < 16:
        raise ValueError(
            f"length {length} is too short for {subset}: its prompt needs {fixed} tokens "
            "besides the context"
        )
    return dataclasses.replace(example, context=truncate_middle(example.context, tokenizer, budget))


def run_longbench(
    engine: LLMEngine, spec: LongBenchSpec, sweep: SweepConfig, progress: bool = True
) -> EvalResult:
    """Score LongBench subsets from local JSONL files at every grid point."""
    import time

    start = time.perf_counter()
    tokenizer = engine.tokenizer
    settings = sweep.settings()
    data = {s: load_longbench(spec.data_dir, s, limit=spec.limit) for s in spec.subsets}
    empty = [s for s, examples in data.items() if not examples]
    if empty:
        raise ValueError(f"no examples in LongBench subset file(s): {', '.join(empty)}")
    jobs: list[Job] = []
    for subset, examples in data.items():
        chat = sweep.chat and subset not in LONGBENCH_NO_CHAT
        overhead = chat_overhead(tokenizer) if chat else 0
        for length in spec.lengths:
            for index, example in enumerate(examples):
                fitted = _fit_example(tokenizer, subset, example, length, overhead)
                prompt = format_prompt(subset, fitted)
                ids = encode_prompt(tokenizer, prompt.context, prompt.question, chat, False)
                for setting in settings:
                    jobs.append(
                        Job(
                            (subset, length, setting, index),
                            ids,
                            SUBSETS[subset].max_new_tokens,
                            sweep.compression(setting),
                            sweep.compress_context_only,
                        )
                    )
    outcomes = _execute(engine, jobs, "longbench", progress)

    def score(subset: str, length: int, done: list[_Outcome]) -> float:
        examples = data[subset]
        return score_longbench(
            subset,
            [o.prediction for o in done],
            [examples[o.index].answers for o in done],
            examples[0].all_classes,
        )

    groups = [(s, n) for s in spec.subsets for n in spec.lengths]
    rows = _collect_rows("longbench", sweep, groups, outcomes, score)
    config = {**dataclasses.asdict(spec), **_sweep_config(sweep)}
    kept = _kept_grid(sweep, (spec.subsets[0], max(spec.lengths)), outcomes)
    return EvalResult(
        "longbench", rows, config, kept, time.perf_counter() - start, _predictions(outcomes)
    )
