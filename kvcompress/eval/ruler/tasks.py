"""The task generators: each plans one instance, the length search then sizes its haystack."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from typing import Any

from kvcompress.eval.ruler import vocab
from kvcompress.eval.ruler.haystack import Haystack, draw_haystack, needle_depths, weave
from kvcompress.eval.ruler.plan import Budget, Draft, Plan, RulerConfig, TaskSpec

__all__ = ["TASKS"]


def _join_keys(keys: Sequence[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]


# --- Needle retrieval -------------------------------------------------------------------


def _niah_plan(
    hay: Haystack,
    preamble: str,
    needles: list[tuple[float, str]],
    question: str,
    answers: list[str],
    meta: dict[str, Any],
) -> Plan:
    def build(n: int) -> Draft:
        context = preamble + weave(hay.take(n), needles)
        return Draft(context, question, answers, {**meta, "depths": [d for d, _ in needles]})

    return Plan(build)


def _plan_niah_single(rng: random.Random, cfg: RulerConfig, budget: Budget) -> Plan:
    hay = draw_haystack(rng, cfg)
    (value,) = vocab.fresh(rng, vocab.number(cfg.value_digits), 1, hay.source)
    depth = needle_depths(rng, cfg, 1)
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


def _keyed_needles(
    rng: random.Random, cfg: RulerConfig, hay: Haystack
) -> tuple[list[str], list[str], list[tuple[float, str]]]:
    """``cfg.num_keys`` fresh keys, a number for each, and their needles at random depths."""
    keys = vocab.fresh(rng, vocab.key, cfg.num_keys, hay.source)
    values = vocab.fresh(rng, vocab.number(cfg.value_digits), cfg.num_keys, hay.source)
    depths = needle_depths(rng, cfg, cfg.num_keys)
    needles = [
        (d, f"The special magic number for {k} is {v}.")
        for d, k, v in zip(depths, keys, values, strict=True)
    ]
    return keys, values, needles


def _plan_niah_multikey(rng: random.Random, cfg: RulerConfig, budget: Budget) -> Plan:
    hay = draw_haystack(rng, cfg)
    keys, values, needles = _keyed_needles(rng, cfg, hay)
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


def _plan_niah_multivalue(rng: random.Random, cfg: RulerConfig, budget: Budget) -> Plan:
    hay = draw_haystack(rng, cfg)
    (key,) = vocab.fresh(rng, vocab.key, 1, hay.source)
    values = vocab.fresh(rng, vocab.number(cfg.value_digits), cfg.num_values, hay.source)
    depths = needle_depths(rng, cfg, cfg.num_values)
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


def _plan_niah_multiquery(rng: random.Random, cfg: RulerConfig, budget: Budget) -> Plan:
    hay = draw_haystack(rng, cfg)
    keys, values, needles = _keyed_needles(rng, cfg, hay)
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


def _plan_vt(rng: random.Random, cfg: RulerConfig, budget: Budget) -> Plan:
    hay = draw_haystack(rng, cfg)
    per_chain = cfg.vt_hops + 1
    names = vocab.fresh(rng, vocab.var_name, cfg.vt_chains * per_chain, hay.source)
    values = vocab.fresh(rng, vocab.number(cfg.value_digits), cfg.vt_chains, hay.source)
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


def _cwe_common_freq(cfg: RulerConfig, budget: Budget, common: list[str]) -> int:
    """How often each common word is repeated.

    Ten words x 30 repeats alone would overflow short targets, so (as RULER does for
    short contexts) the repeats shrink until the common words take at most half the
    budget, but never below uncommon_freq + 1, which keeps them strictly most common.
    """
    entry_tokens = budget.count("\n".join(f"{i}. {w}" for i, w in enumerate(common, 100)))
    affordable = int(budget.target / 2 / max(entry_tokens, 1))
    return max(cfg.cwe_uncommon_freq + 1, min(cfg.cwe_common_freq, affordable))


def _plan_cwe(rng: random.Random, cfg: RulerConfig, budget: Budget) -> Plan:
    common = vocab.fresh(rng, vocab.pseudo_word, cfg.cwe_num_common, "")
    common_freq = _cwe_common_freq(cfg, budget, common)
    list_seed = rng.getrandbits(64)
    k = cfg.cwe_num_common

    def build(n: int) -> Draft:
        # n counts uncommon list entries, not words, so the length search can add one
        # entry at a time; a few uncommon words may then occur fewer than freq times.
        list_rng = random.Random(list_seed)
        freq = cfg.cwe_uncommon_freq
        uncommon = vocab.fresh(list_rng, vocab.pseudo_word, -(-n // freq), " ".join(common))
        entries = common * common_freq + (uncommon * freq)[:n]
        list_rng.shuffle(entries)
        listing = "\n".join(f"{i}. {word}" for i, word in enumerate(entries, start=1))
        return Draft(
            "Below is a numbered list of words. Some of the words occur many times.\n\n" + listing,
            f"\n\nQuestion: What are the {k} most common words in the list above? "
            f"Answer: The {k} most common words in the list are:",
            list(common),
            {"common_freq": common_freq, "uncommon_freq": cfg.cwe_uncommon_freq},
        )

    return Plan(build)


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


def _plan_fwe(rng: random.Random, cfg: RulerConfig, budget: Budget) -> Plan:
    words = vocab.fresh(rng, vocab.code_word, cfg.fwe_vocab, "")
    order_seed = rng.getrandbits(64)
    k = cfg.fwe_num_answers

    def build(n: int) -> Draft:
        counts = _zipf_counts(n, cfg.fwe_vocab, cfg.fwe_alpha, k)
        text = [word for word, c in zip(words, counts, strict=True) for _ in range(c)]
        random.Random(order_seed).shuffle(text)
        return Draft(
            "Read the coded text below and keep count of how often each coded word "
            "occurs.\n\n" + " ".join(text),
            f"\n\nQuestion: What are the {k} most frequent coded words in the text above? "
            f"Answer: The {k} most frequent coded words are:",
            words[:k],
            {"counts": counts[: k + 1]},
        )

    return Plan(build)


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
