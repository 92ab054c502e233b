import json
import re
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcompress.eval.ruler import TASKS, RulerConfig, Sample, generate_sample, generate_tasks
from kvcompress.eval.scoring import RULER_METRICS
from kvcompress.eval.texts import pydoc_text
from tests.eval.conftest import whitespace_count

ALL_TASKS = sorted(TASKS)
NATURAL = RulerConfig(haystack="natural")


def test_registry_names_and_metrics():
    assert set(TASKS) == {
        "niah_single",
        "niah_multikey",
        "niah_multivalue",
        "niah_multiquery",
        "vt",
        "cwe",
        "fwe",
    }
    for name, spec in TASKS.items():
        assert spec.name == name
        assert name in RULER_METRICS
        assert spec.max_new_tokens > 0


def test_same_seed_same_samples():
    first = generate_tasks("all", [300], 2, seed=7, count_tokens=whitespace_count)
    second = generate_tasks("all", [300], 2, seed=7, count_tokens=whitespace_count)
    assert first == second
    assert [s.task for s in first] == [t for t in TASKS for _ in range(2)]


@pytest.mark.parametrize("task", ALL_TASKS)
def test_different_seeds_and_indices_differ(task):
    a = generate_sample(task, 300, whitespace_count, seed=1)
    b = generate_sample(task, 300, whitespace_count, seed=2)
    c = generate_sample(task, 300, whitespace_count, seed=1, index=1)
    assert a.context != b.context and a.answers != b.answers
    assert a.context != c.context


@pytest.mark.parametrize("config", [RulerConfig(), NATURAL], ids=["repeat", "natural"])
@pytest.mark.parametrize("task", ALL_TASKS)
def test_answers_in_context_not_in_question(task, config):
    for index in range(3):
        sample = generate_sample(task, 400, whitespace_count, seed=3, index=index, config=config)
        assert sample.answers
        for answer in sample.answers:
            assert answer in sample.context
            assert answer not in sample.question
        assert sample.prompt == sample.context + sample.question
        assert sample.question.strip()


@pytest.mark.parametrize("task", ALL_TASKS)
@pytest.mark.parametrize("target", [300, 1000, 4000])
def test_length_fits_target_whitespace(task, target):
    sample = generate_sample(task, target, whitespace_count, seed=5)
    assert sample.length_tokens == whitespace_count(sample.prompt)
    assert 0.97 * target <= sample.length_tokens <= target
    assert sample.meta["target_tokens"] == target


@pytest.mark.parametrize("config", [RulerConfig(), NATURAL], ids=["repeat", "natural"])
@pytest.mark.parametrize("target", [512, 2048])
def test_length_fits_target_real_tokenizer(bpe_tokenizer, config, target):
    samples = generate_tasks("all", [target], 1, seed=11, count_tokens=bpe_tokenizer, config=config)
    for sample in samples:
        measured = len(bpe_tokenizer.encode(sample.prompt, add_special_tokens=False).ids)
        assert sample.length_tokens == measured
        assert 0.97 * target <= measured <= target, sample.task


def test_vt_chain_resolves_to_answers():
    cfg = RulerConfig(vt_chains=3, vt_hops=3)
    for index in range(3):
        sample = generate_sample("vt", 600, whitespace_count, seed=2, index=index, config=cfg)
        values: dict[str, str] = {}
        # Statements must resolve in reading order: a chain is never referenced early.
        for name, rhs in re.findall(r"VAR ([A-Z]{5}) = ([A-Z]{5}|\d+)\.", sample.context):
            values[name] = values[rhs] if rhs.isalpha() else rhs
        assert len(values) == 3 * 4
        holders = sorted(n for n, v in values.items() if v == sample.meta["value"])
        assert holders == sorted(sample.answers)
        assert f"{len(sample.answers)} variables" in sample.question


def _listed_words(sample: Sample) -> list[str]:
    body = sample.context.split("\n\n", 1)[1]
    return re.findall(r"^\d+\. (\w+)$", body, flags=re.MULTILINE)


@pytest.mark.parametrize("target", [300, 3000])
def test_cwe_answers_are_strictly_most_common(target):
    sample = generate_sample("cwe", target, whitespace_count, seed=4)
    counts = Counter(_listed_words(sample))
    assert len(sample.answers) == 10
    lowest_answer = min(counts[a] for a in sample.answers)
    others = [c for w, c in counts.items() if w not in sample.answers]
    assert others and lowest_answer > max(others)


@pytest.mark.parametrize("target", [300, 3000])
def test_fwe_answers_are_strictly_most_frequent(target):
    sample = generate_sample("fwe", target, whitespace_count, seed=4)
    counts = Counter(sample.context.split("\n\n", 1)[1].split())
    ranked = [word for word, _ in counts.most_common()]
    assert ranked[:3] == sample.answers
    assert counts[ranked[2]] > counts[ranked[3]]


def test_depth_places_needle():
    for depth, lo, hi in [(0.0, 0.0, 0.1), (0.5, 0.4, 0.6), (1.0, 0.9, 1.0)]:
        cfg = RulerConfig(depth=depth)
        sample = generate_sample("niah_single", 1000, whitespace_count, seed=0, config=cfg)
        where = sample.context.index(sample.answers[0]) / len(sample.context)
        assert lo <= where <= hi, (depth, where)
        assert sample.meta["depths"] == [depth]


def test_depth_spread_by_seed():
    depths = {
        generate_sample("niah_single", 300, whitespace_count, seed=s).meta["depths"][0]
        for s in range(5)
    }
    assert len(depths) == 5


def test_natural_haystack_uses_text():
    sample = generate_sample("niah_single", 500, whitespace_count, seed=0, config=NATURAL)
    words = sample.context.split()
    assert " ".join(words[40:50]) in " ".join(pydoc_text().split())

    custom = RulerConfig(haystack="natural", haystack_text="Alpha beta gamma. Delta epsilon.")
    sample = generate_sample("niah_multikey", 200, whitespace_count, config=custom)
    assert "Delta epsilon." in sample.context


def test_sample_score_and_serialisation():
    sample = generate_sample("niah_multivalue", 300, whitespace_count)
    assert sample.score(", ".join(sample.answers)) == 1.0
    assert sample.score(sample.answers[0]) == 1 / len(sample.answers)
    assert sample.score("") == 0.0
    row = json.loads(json.dumps(sample.to_dict()))
    assert row["prompt"] == sample.prompt and row["answers"] == sample.answers
    assert sample.max_new_tokens == TASKS["niah_multivalue"].max_new_tokens
    hash(sample)  # frozen and hashable despite list/dict fields


def test_errors():
    with pytest.raises(ValueError, match="too short"):
        generate_sample("cwe", 20, whitespace_count)
    with pytest.raises(KeyError, match="unknown"):
        generate_tasks(["niah_single", "nope"], [300], 1, 0, whitespace_count)
    with pytest.raises(ValueError):
        RulerConfig(depth=1.5)
    with pytest.raises(ValueError):
        RulerConfig(num_keys=2, num_queries=3)
    with pytest.raises(TypeError):
        generate_sample("niah_single", 300, 42)  # type: ignore[arg-type]


@settings(max_examples=25, deadline=None)
@given(
    task=st.sampled_from(ALL_TASKS),
    target=st.integers(min_value=250, max_value=3000),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_length_property(task, target, seed):
    sample = generate_sample(task, target, whitespace_count, seed=seed)
    assert 0.97 * target <= sample.length_tokens <= target
    assert all(answer in sample.context for answer in sample.answers)


def test_import_is_light():
    # Generating tasks must not pay for torch / rouge-score / rapidfuzz imports.
    code = (
        "import sys, kvcompress.eval; "
        "heavy = {'torch', 'rouge_score', 'rapidfuzz'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
