"""Samples: a task planned from its seed key, sized to the target length."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from kvcompress.eval.ruler.fit import fit_units
from kvcompress.eval.ruler.plan import Budget, RulerConfig
from kvcompress.eval.ruler.tasks import TASKS
from kvcompress.eval.scoring import RULER_METRICS
from kvcompress.eval.texts import CountTokens, TokenizerLike, as_token_counter

__all__ = ["Sample", "generate_sample", "generate_tasks"]


@dataclass(frozen=True)
class Sample:
    """One generated task instance.

    `length_tokens` is the token count of the full `prompt` under the `count_tokens`
    used to generate it. `meta` records how it was built (target length, needle depths,
    haystack size, seed key) so results can be sliced by depth or length.
    """

    task: str
    context: str
    question: str
    answers: list[str] = field(hash=False)
    length_tokens: int
    meta: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def prompt(self) -> str:
        """The full prompt: context followed by the question and answer prefix."""
        return self.context + self.question

    @property
    def max_new_tokens(self) -> int:
        """A generation budget that fits the complete answer."""
        return TASKS[self.task].max_new_tokens

    def score(self, prediction: str) -> float:
        """This sample's RULER score in [0, 1] for a model's `prediction`."""
        return RULER_METRICS[self.task](prediction, self.answers)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict including the full prompt (for writing JSONL)."""
        return {**asdict(self), "prompt": self.prompt}


def _seed_key(seed: int, task: str, target: int, index: int) -> str:
    return f"kvcompress-ruler:{seed}:{task}:{target}:{index}"


def generate_sample(
    task: str,
    target_tokens: int,
    count_tokens: CountTokens | TokenizerLike,
    seed: int = 0,
    index: int = 0,
    config: RulerConfig | None = None,
) -> Sample:
    """Generate sample `index` of `task` whose prompt fits in `target_tokens` tokens."""
    if task not in TASKS:
        raise KeyError(f"unknown RULER task {task!r}; known: {sorted(TASKS)}")
    cfg = config or RulerConfig()
    count = as_token_counter(count_tokens)
    key = _seed_key(seed, task, target_tokens, index)
    plan = TASKS[task].plan(random.Random(key), cfg, Budget(target_tokens, count))

    cache: dict[int, int] = {}

    def measure(n: int) -> int:
        if n not in cache:
            draft = plan.build(n)
            cache[n] = count(draft.context + draft.question)
        return cache[n]

    units = fit_units(measure, target_tokens, plan.min_units)
    draft = plan.build(units)
    meta = {
        **draft.meta,
        "seed_key": key,
        "index": index,
        "target_tokens": target_tokens,
        "haystack": cfg.haystack,
        "haystack_units": units,
    }
    return Sample(task, draft.context, draft.question, draft.answers, measure(units), meta)


def generate_tasks(
    tasks: str | Iterable[str],
    lengths: int | Iterable[int],
    num_samples: int,
    seed: int,
    count_tokens: CountTokens | TokenizerLike,
    config: RulerConfig | None = None,
) -> list[Sample]:
    """Samples for every (task, length) pair, `num_samples` each, in that nesting order.

    `tasks` may be a single name, a list of names, or "all". Lengths are targets for the
    full prompt in `count_tokens` tokens (a callable or an object with `encode`).
    Special tokens are not counted (a tokenizer's `encode` runs without them), nor is any
    chat template the caller wraps the prompt in: leave headroom for those.
    """
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if names == ["all"]:
        names = list(TASKS)
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise KeyError(f"unknown RULER task(s) {unknown}; known: {sorted(TASKS)}")
    targets = [lengths] if isinstance(lengths, int) else list(lengths)
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    count = as_token_counter(count_tokens)
    return [
        generate_sample(name, target, count, seed, index, config)
        for name in names
        for target in targets
        for index in range(num_samples)
    ]
