"""RULER-style synthetic long-context tasks, generated offline and deterministically.

Each task hides short, exactly checkable facts in a haystack and asks for them back:

- needle retrieval (``niah_single``, ``niah_multikey``, ``niah_multivalue``,
  ``niah_multiquery``): key/number facts among filler sentences or natural text;
- multi-hop tracing (``vt``): chains of variable assignments, answer every name that
  ends up holding the queried value;
- aggregation (``cwe``, ``fwe``): find the most common words of a list or coded text.

The haystack is grown or shrunk until the whole prompt (context + question) is as long
as possible without exceeding the target length, measured in the caller's tokens; it
lands within one haystack unit (a word, or a list entry) of the target.

Every random choice comes from a `random.Random` seeded by a string built from
(seed, task, target length, sample index): string seeds are hashed with SHA-512 by
`random`, so samples are identical across processes and platforms, independent of
PYTHONHASHSEED.

A sample's `context` holds the instructions and the haystack and its `question` the
query and an answer prefix, so a caller can prefill and compress the context before
the question arrives; ``sample.prompt == sample.context + sample.question``.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NamedTuple

from kvcompress.eval.scoring import RULER_METRICS
from kvcompress.eval.texts import (
    CountTokens,
    TokenizerLike,
    as_token_counter,
    pydoc_text,
)

__all__ = [
    "TASKS",
    "RulerConfig",
    "Sample",
    "TaskSpec",
    "generate_sample",
    "generate_tasks",
]


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


class _Draft(NamedTuple):
    """A task instance at one haystack size, before its length is accepted."""

    context: str
    question: str
    answers: list[str]
    meta: dict[str, Any]


class _Plan(NamedTuple):
    """A task instance with every size-independent random choice already made.

    `build(n)` must be a pure function of `n` (it may reseed its own RNG from a fixed
    key) so that the length search can probe sizes in any order.
    """

    build: Callable[[int], _Draft]
    min_units: int = 0


class _Budget(NamedTuple):
    """The length target, for tasks whose fixed part must scale with it."""

    target: int
    count: CountTokens


PlanFn = Callable[[random.Random, RulerConfig, _Budget], _Plan]


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: how to plan it and how long its answer may be."""

    name: str
    category: Literal["retrieval", "tracing", "aggregation"]
    description: str
    max_new_tokens: int
    plan: PlanFn = field(repr=False)


# --- Vocabulary and haystacks -----------------------------------------------------------

# Neutral sentences with no digits and no capitalised key-like words, so that no needle
# value or variable name can occur in the filler by accident.
_FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is warm.",
    "The river runs to the sea.",
    "The road goes on and on.",
)

# Keys are adjective-noun pairs ("amber-anchor"): 900 of them, easy to read and quote.
# fmt: off
_ADJECTIVES = (
    "amber", "brave", "calm", "dusty", "eager", "fancy", "gentle", "hollow", "icy", "jolly",
    "keen", "lively", "misty", "noble", "odd", "proud", "quiet", "rapid", "silent", "tidy",
    "vivid", "witty", "young", "zesty", "bold", "crisp", "deep", "faint", "grand", "lucky",
)
_NOUNS = (
    "anchor", "badger", "candle", "dolphin", "engine", "falcon", "garden", "harbor", "island",
    "jacket", "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quartz", "river",
    "saddle", "tunnel", "umbrella", "violin", "walnut", "yacht", "zebra", "bridge", "castle",
    "desert", "forest", "glacier",
)
# fmt: on

_CONSONANTS = "bdfghklmnprstvz"
_VOWELS = "aeiou"


@functools.lru_cache(maxsize=4)
def _words(text: str) -> tuple[str, ...]:
    words = tuple(text.split())
    if not words:
        raise ValueError("haystack_text has no words")
    return words


_SENTENCE_END = (".", "!", "?")


class _Haystack(NamedTuple):
    """Filler words read cyclically from `start`, and the text they come from.

    The haystack is sized in words rather than sentences so that the prompt can land
    within a token or two of the target; needles are still placed at sentence ends.
    """

    words: tuple[str, ...]
    start: int
    source: str  # needle values must not occur here, to keep answers unambiguous

    def take(self, n: int) -> list[str]:
        size = len(self.words)
        return [self.words[(self.start + i) % size] for i in range(n)]


def _haystack(rng: random.Random, cfg: RulerConfig) -> _Haystack:
    if cfg.haystack == "repeat":
        source = " ".join(_FILLER)
        return _Haystack(_words(source), 0, source)
    text = cfg.haystack_text if cfg.haystack_text is not None else pydoc_text()
    words = _words(text)
    # Start at a sentence beginning somewhere in the text, so samples differ.
    start = _snap_to_sentence(words, rng.randrange(len(words)))
    return _Haystack(words, start, text)


def _snap_to_sentence(words: Sequence[str], index: int, reach: int = 64) -> int:
    """The last sentence start at or before `index`, if one is within `reach` words.

    Text without full stops nearby (tables, code) has no boundary to snap to; then the
    index is kept rather than moving a needle far from its intended depth.
    """
    for i in range(index, max(index - reach, -1), -1):
        if i == 0 or words[i - 1].endswith(_SENTENCE_END):
            return i
    return index


def _fresh(
    rng: random.Random, make: Callable[[random.Random], str], count: int, avoid: str
) -> list[str]:
    """`count` distinct items from `make`, none occurring in `avoid`.

    Items that already occur in the haystack source would make the answer ambiguous
    (and string matching meaningless), so they are redrawn.
    """
    items: list[str] = []
    seen: set[str] = set()
    attempts = 0
    while len(items) < count:
        attempts += 1
        if attempts > 1000 * count + 1000:
            raise RuntimeError(f"could not draw {count} distinct items; vocabulary too small")
        item = make(rng)
        if item not in seen and item not in avoid:
            seen.add(item)
            items.append(item)
    return items


def _number(digits: int) -> Callable[[random.Random], str]:
    # Fixed digit count, leading digit non-zero: no value is a substring of another.
    return lambda rng: str(rng.randrange(10 ** (digits - 1), 10**digits))


def _key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def _var_name(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_uppercase, k=5))


def _pseudo_word(rng: random.Random) -> str:
    # Three consonant-vowel syllables: pronounceable, and all the same length, so no
    # word is a substring of another and substring scoring stays exact.
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(3))


def _code_word(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=4))


def _depths(rng: random.Random, cfg: RulerConfig, count: int) -> list[float]:
    """Depths for `count` needles; the first is the configured (or queried) one."""
    first = cfg.depth if cfg.depth is not None else rng.random()
    return [first] + [rng.random() for _ in range(count - 1)]


def _weave(filler: list[str], needles: Sequence[tuple[float, str]]) -> str:
    """Insert needles into the filler words at their depths, at sentence boundaries.

    Sorting is stable and snapping is monotone, so needles keep their given order when
    their depths ascend (which keeps variable-tracking chains in assignment order).
    """
    slots = sorted(
        ((_snap_to_sentence(filler, round(d * len(filler))), text) for d, text in needles),
        key=lambda slot: slot[0],
    )
    out: list[str] = []
    cursor = 0
    for slot, text in slots:
        out.extend(filler[cursor:slot])
        out.append(text)
        cursor = slot
    out.extend(filler[cursor:])
    return " ".join(out)


def _join_keys(keys: Sequence[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]


# --- Needle retrieval -------------------------------------------------------------------


def _niah_plan(
    hay: _Haystack,
    preamble: str,
    needles: list[tuple[float, str]],
    question: str,
    answers: list[str],
    meta: dict[str, Any],
) -> _Plan:
    def build(n: int) -> _Draft:
        context = preamble + _weave(hay.take(n), needles)
        return _Draft(context, question, answers, {**meta, "depths": [d for d, _ in needles]})

    return _Plan(build)


def _plan_niah_single(rng: random.Random, cfg: RulerConfig, budget: _Budget) -> _Plan:
    hay = _haystack(rng, cfg)
    (value,) = _fresh(rng, _number(cfg.value_digits), 1, hay.source)
    depth = _depths(rng, cfg, 1)
    return _niah_plan(
        hay,
        "A pass key is hidden somewhere in the text below. Find it and memorize it; "
        "I will ask you for it afterwards.\n\n",
        [(depth[0], f"The pass key is {value}. Remember it.")],
        "\n\nWhat is the pass key? The pass key is",
        [value],
        {},
    )


_MAGIC_PREAMBLE = (
    "Special magic numbers are hidden in the text below, each one tied to a key. "
    "Memorize them; I will ask you about them afterwards.\n\n"
)


def _plan_niah_multikey(rng: random.Random, cfg: RulerConfig, budget: _Budget) -> _Plan:
    hay = _haystack(rng, cfg)
    keys = _fresh(rng, _key, cfg.num_keys, hay.source)
    values = _fresh(rng, _number(cfg.value_digits), cfg.num_keys, hay.source)
    depths = _depths(rng, cfg, cfg.num_keys)
    needles = [
        (d, f"The special magic number for {k} is {v}.")
        for d, k, v in zip(depths, keys, values, strict=True)
    ]
    # The first needle is the queried one, so `depth` controls where the answer sits.
    return _niah_plan(
        hay,
        _MAGIC_PREAMBLE,
        needles,
        f"\n\nWhat is the special magic number for {keys[0]} mentioned in the text above? "
        f"The special magic number for {keys[0]} is",
        [values[0]],
        {"key": keys[0], "distractor_keys": keys[1:]},
    )


def _plan_niah_multivalue(rng: random.Random, cfg: RulerConfig, budget: _Budget) -> _Plan:
    hay = _haystack(rng, cfg)
    (key,) = _fresh(rng, _key, 1, hay.source)
    values = _fresh(rng, _number(cfg.value_digits), cfg.num_values, hay.source)
    depths = _depths(rng, cfg, cfg.num_values)
    needles = [
        (d, f"One of the special magic numbers for {key} is {v}.")
        for d, v in zip(depths, values, strict=True)
    ]
    return _niah_plan(
        hay,
        _MAGIC_PREAMBLE,
        needles,
        f"\n\nWhat are all the special magic numbers for {key} mentioned in the text above? "
        f"The special magic numbers for {key} are",
        values,
        {"key": key},
    )


def _plan_niah_multiquery(rng: random.Random, cfg: RulerConfig, budget: _Budget) -> _Plan:
    hay = _haystack(rng, cfg)
    keys = _fresh(rng, _key, cfg.num_keys, hay.source)
    values = _fresh(rng, _number(cfg.value_digits), cfg.num_keys, hay.source)
    depths = _depths(rng, cfg, cfg.num_keys)
    needles = [
        (d, f"The special magic number for {k} is {v}.")
        for d, k, v in zip(depths, keys, values, strict=True)
    ]
    asked = _join_keys(keys[: cfg.num_queries])
    return _niah_plan(
        hay,
        _MAGIC_PREAMBLE,
        needles,
        f"\n\nWhat are the special magic numbers for {asked} mentioned in the text above? "
        f"The special magic numbers for {asked} are",
        values[: cfg.num_queries],
        {"keys": keys[: cfg.num_queries], "distractor_keys": keys[cfg.num_queries :]},
    )


# --- Variable tracking ------------------------------------------------------------------


def _plan_vt(rng: random.Random, cfg: RulerConfig, budget: _Budget) -> _Plan:
    hay = _haystack(rng, cfg)
    per_chain = cfg.vt_hops + 1
    names = _fresh(rng, _var_name, cfg.vt_chains * per_chain, hay.source)
    values = _fresh(rng, _number(cfg.value_digits), cfg.vt_chains, hay.source)
    chains = [names[c * per_chain : (c + 1) * per_chain] for c in range(cfg.vt_chains)]

    needles: list[tuple[float, str]] = []
    for c, (chain, value) in enumerate(zip(chains, values, strict=True)):
        # Ascending depths keep each chain in assignment order; chain 0 (the queried
        # one) starts at the configured depth when one is given.
        depths = sorted(rng.random() for _ in range(per_chain))
        if c == 0 and cfg.depth is not None:
            depths = [cfg.depth + (1.0 - cfg.depth) * i / per_chain for i in range(per_chain)]
        statements = [f"VAR {chain[0]} = {value}."]
        statements += [f"VAR {cur} = {prev}." for prev, cur in itertools.pairwise(chain)]
        needles += list(zip(depths, statements, strict=True))

    value = values[0]
    return _niah_plan(
        hay,
        "Variable assignments are hidden in the text below. Keep track of them: a "
        "variable is set either to a number or to another variable's value.\n\n",
        needles,
        f"\n\nQuestion: Which variables in the text above hold the value {value}? "
        f"Answer: {per_chain} variables hold the value {value}. They are:",
        chains[0],
        {"value": value, "distractor_chains": chains[1:]},
    )


# --- Aggregation ------------------------------------------------------------------------


def _cwe_common_freq(cfg: RulerConfig, budget: _Budget, common: list[str]) -> int:
    """How often each common word is repeated.

    Ten words x 30 repeats alone would overflow short targets, so (as RULER does for
    short contexts) the repeats shrink until the common words take at most half the
    budget, but never below uncommon_freq + 1, which keeps them strictly most common.
    """
    entry_tokens = budget.count("\n".join(f"{i}. {w}" for i, w in enumerate(common, 100)))
    affordable = int(budget.target / 2 / max(entry_tokens, 1))
    return max(cfg.cwe_uncommon_freq + 1, min(cfg.cwe_common_freq, affordable))


def _plan_cwe(rng: random.Random, cfg: RulerConfig, budget: _Budget) -> _Plan:
    common = _fresh(rng, _pseudo_word, cfg.cwe_num_common, "")
    common_freq = _cwe_common_freq(cfg, budget, common)
    list_seed = rng.getrandbits(64)
    k = cfg.cwe_num_common

    def build(n: int) -> _Draft:
        # n counts uncommon list entries, not words, so the length search can add one
        # entry at a time; a few uncommon words may then occur fewer than freq times.
        list_rng = random.Random(list_seed)
        freq = cfg.cwe_uncommon_freq
        uncommon = _fresh(list_rng, _pseudo_word, -(-n // freq), " ".join(common))
        entries = common * common_freq + (uncommon * freq)[:n]
        list_rng.shuffle(entries)
        listing = "\n".join(f"{i}. {word}" for i, word in enumerate(entries, start=1))
        return _Draft(
            "Below is a numbered list of words. Some of the words occur many times.\n\n" + listing,
            f"\n\nQuestion: What are the {k} most common words in the list above? "
            f"Answer: The {k} most common words in the list are:",
            list(common),
            {"common_freq": common_freq, "uncommon_freq": cfg.cwe_uncommon_freq},
        )

    return _Plan(build)


def _zipf_counts(total: int, vocab: int, alpha: float, top: int) -> list[int]:
    """Word counts by rank, roughly Zipfian, with the `top` ranks strictly ahead.

    The expected Zipf counts are rounded down; then each of the first `top` ranks is
    lifted to at least one more than the next rank, so the answer is never a tie.
    """
    weights = [rank**-alpha for rank in range(1, vocab + 1)]
    norm = sum(weights)
    counts = [int(total * w / norm) for w in weights]
    for i in reversed(range(top)):
        counts[i] = max(counts[i], counts[i + 1] + 1)
    return counts


def _plan_fwe(rng: random.Random, cfg: RulerConfig, budget: _Budget) -> _Plan:
    words = _fresh(rng, _code_word, cfg.fwe_vocab, "")
    order_seed = rng.getrandbits(64)
    k = cfg.fwe_num_answers

    def build(n: int) -> _Draft:
        counts = _zipf_counts(n, cfg.fwe_vocab, cfg.fwe_alpha, k)
        text = [word for word, c in zip(words, counts, strict=True) for _ in range(c)]
        random.Random(order_seed).shuffle(text)
        return _Draft(
            "Read the coded text below and keep count of how often each coded word "
            "occurs.\n\n" + " ".join(text),
            f"\n\nQuestion: What are the {k} most frequent coded words in the text above? "
            f"Answer: The {k} most frequent coded words are:",
            words[:k],
            {"counts": counts[: k + 1]},
        )

    return _Plan(build)


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("niah_single", "retrieval", "one pass key in filler", 16, _plan_niah_single),
        TaskSpec(
            "niah_multikey",
            "retrieval",
            "several key/number needles, one asked",
            16,
            _plan_niah_multikey,
        ),
        TaskSpec(
            "niah_multivalue",
            "retrieval",
            "one key with several numbers, all asked",
            48,
            _plan_niah_multivalue,
        ),
        TaskSpec(
            "niah_multiquery",
            "retrieval",
            "several key/number needles, several asked",
            48,
            _plan_niah_multiquery,
        ),
        TaskSpec("vt", "tracing", "variables that hold a value through a chain", 48, _plan_vt),
        TaskSpec("cwe", "aggregation", "10 most common words of a list", 96, _plan_cwe),
        TaskSpec("fwe", "aggregation", "3 most frequent words of a coded text", 32, _plan_fwe),
    )
}


# --- Length fitting ---------------------------------------------------------------------


def _fit_units(measure: Callable[[int], int], target: int, min_units: int) -> int:
    """Largest haystack size whose prompt is at most `target` tokens.

    Prompt length grows almost linearly with haystack size, so the search extrapolates
    to a size just past the target, then interpolates inside the bracket, falling back
    to bisection when an interpolation step does not halve it. That takes about six
    tokenisations of a target-sized prompt, against ~15 for plain bisection. Length is
    assumed to grow with size, which holds up to tokenizer noise at needle seams.
    """
    base = measure(min_units)
    if base > target:
        raise ValueError(
            f"target of {target} tokens is too short: the prompt needs {base} tokens "
            "before any haystack is added"
        )
    lo, hi = min_units, min_units + 32
    while measure(hi) <= target:
        lo = hi
        slope = max((measure(lo) - base) / (lo - min_units), 1e-3)
        # Aim 1% past the target so the next probe most likely closes the bracket.
        hi = max(lo + 1, min_units + math.ceil((1.01 * target - base) / slope))
    # Invariant: measure(lo) <= target < measure(hi).
    bisect = False
    while hi - lo > 1:
        width = hi - lo
        if bisect:
            mid = (lo + hi) // 2
        else:
            m_lo, m_hi = measure(lo), measure(hi)
            mid = lo + (target - m_lo) * width // max(m_hi - m_lo, 1)
            mid = min(max(mid, lo + 1), hi - 1)
        if measure(mid) <= target:
            lo = mid
        else:
            hi = mid
        bisect = not bisect and (hi - lo) * 2 > width
    return lo


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
    plan = TASKS[task].plan(random.Random(key), cfg, _Budget(target_tokens, count))

    cache: dict[int, int] = {}

    def measure(n: int) -> int:
        if n not in cache:
            draft = plan.build(n)
            cache[n] = count(draft.context + draft.question)
        return cache[n]

    units = _fit_units(measure, target_tokens, plan.min_units)
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
