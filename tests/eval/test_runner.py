"""The sweep runner: grid planning, prompt building, rows, report and plots.

The model-backed tests share one small engine (`shared_engine`, also used by the other
eval test modules) and tiny prompts, so the module stays fast on a busy CPU.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch

from kvcompress.eval.plots import plot_kept_heatmap, plot_scores, write_plots
from kvcompress.eval.report import format_table, write_csv
from kvcompress.eval.ruler import generate_sample
from kvcompress.eval.runner import (
    FULL,
    EvalResult,
    KeptGrid,
    Row,
    RulerSpec,
    Setting,
    SweepConfig,
    encode_prompt,
    run_ruler,
    split_answer_prefix,
)

from .conftest import whitespace_count


@functools.cache
def shared_engine():
    """One engine on the default model for all eval tests (loaded on first use)."""
    from kvcompress.engine import EngineConfig, LLMEngine

    # Other test runs share the CPU: one thread each avoids oversubscription.
    torch.set_num_threads(1)
    return LLMEngine(EngineConfig(kv_cache_memory="256MiB", max_num_seqs=16))


@pytest.fixture(scope="module")
def engine():
    return shared_engine()


# --- Grid planning ----------------------------------------------------------------------


def test_full_and_rate_one_share_one_run():
    sweep = SweepConfig(policies=("full", "kvcompress", "random"), rates=(1, 4, 16))
    assert sweep.settings() == [
        FULL,
        *(Setting(p, r) for p in ("kvcompress", "random") for r in (4, 16)),
    ]
    assert sweep.run_setting("full", 16) == FULL
    assert sweep.run_setting("kvcompress", 1) == FULL
    assert sweep.compression(FULL).evicts is False
    params = sweep.compression(Setting("kvcompress", 4))
    assert (params.policy, params.compression_rate, params.evicts) == ("kvcompress", 4.0, True)
    assert sweep.heatmap_rate() == 16
    assert SweepConfig(rates=(1,)).heatmap_rate() is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"policies": ("kvcompress", "nope")}, "unknown policy"),
        ({"policies": ()}, "no policies"),
        ({"rates": (0.5,)}, "rates must be numbers >= 1"),
        ({"protected_window": -1}, "protected_window"),
    ],
)
def test_sweep_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SweepConfig(**kwargs)


def test_ruler_spec_rejects_unknown_task():
    with pytest.raises(ValueError, match="unknown RULER task"):
        RulerSpec(tasks=("niah_single", "haystack"))


# --- Prompts ------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["niah_single", "niah_multikey", "vt", "cwe", "fwe"])
def test_answer_prefix_split(task):
    sample = generate_sample(task, 200, whitespace_count)
    query, prefix = split_answer_prefix(sample.question)
    assert query.endswith("?")
    assert prefix and not prefix.startswith("Answer")
    assert sample.question.startswith(query) and sample.question.endswith(prefix)


def test_question_without_prefix_is_left_whole():
    assert split_answer_prefix("\n\nSummarize.") == ("\n\nSummarize.", "")


def test_chat_prompt_puts_answer_prefix_after_assistant_header(engine):
    tokenizer = engine.tokenizer
    sample = generate_sample("niah_single", 200, tokenizer)
    ids = encode_prompt(tokenizer, sample.context, sample.question, chat=True, answer_prefix=True)
    question = tokenizer.decode(ids.question)
    assert question.startswith("What is the pass key?")
    assert question.endswith("assistant\nThe pass key is")
    assert "<|im_start|>user" in tokenizer.decode(ids.context)
    raw = encode_prompt(tokenizer, sample.context, sample.question, chat=False, answer_prefix=True)
    assert tokenizer.decode(raw.context + raw.question) == sample.prompt


# --- Report and plots (no model) ----------------------------------------------------------


def _rows() -> list[Row]:
    return [
        Row("ruler", task, 512, policy, rate, 1.0 if policy == "full" else rate * 0.9, 2, score)
        for task in ("niah_single", "vt")
        for policy, rate, score in [
            ("full", 1, 100.0),
            ("full", 8, 100.0),
            ("random", 1, 100.0),
            ("random", 8, 25.0),
        ]
    ]


def test_table_and_csv(tmp_path):
    rows = _rows()
    table = format_table(rows).splitlines()
    assert table[0].split() == [
        "suite",
        "task",
        "length",
        "policy",
        "rate",
        "achieved_rate",
        "score",
        "num_samples",
    ]
    assert len(table) == len(rows) + 1
    path = write_csv(rows, tmp_path / "out" / "rows.csv")
    lines = path.read_text().splitlines()
    assert lines[0] == "suite,task,length,policy,rate,achieved_rate,score,num_samples"
    assert len(lines) == len(rows) + 1
    fidelity = Row("fidelity", "pydoc", 512, "random", 8, 6.5, 1, agreement=0.5, kl=0.25)
    assert list(fidelity.as_dict())[-3:] == ["agreement", "kl", "num_samples"]


def test_plots_are_written(tmp_path):
    kept = KeptGrid("niah_single", 512, 8, 0, {"uniform": [[6, 6]] * 3, "kvcompress": [[4, 9]] * 3})
    result = EvalResult("ruler", _rows(), {}, kept)
    paths = write_plots(result, tmp_path / "plots")
    assert [p.name for p in paths] == ["ruler_scores.png", "ruler_kept_kvs.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    assert plot_scores(_rows(), tmp_path / "s.png").stat().st_size > 1000
    assert plot_kept_heatmap(kept, tmp_path / "k.png").stat().st_size > 1000


# --- A real (tiny) sweep --------------------------------------------------------------------


def test_ruler_sweep_rows_and_document(engine):
    sweep = SweepConfig(policies=("full", "kvcompress", "random"), rates=(1, 16), chat=True)
    spec = RulerSpec(tasks=("niah_single",), lengths=(256,), num_samples=2)
    result = run_ruler(engine, spec, sweep, progress=False)

    assert [(r.policy, r.rate) for r in result.rows] == [
        (p, r) for p in ("full", "kvcompress", "random") for r in (1, 16)
    ]
    by = {(r.policy, r.rate): r for r in result.rows}
    for row in result.rows:
        assert row.as_dict().keys() == {
            "suite",
            "task",
            "length",
            "policy",
            "rate",
            "achieved_rate",
            "score",
            "num_samples",
        }
        assert (row.suite, row.task, row.length, row.num_samples) == (
            "ruler",
            "niah_single",
            256,
            2,
        )
        assert 0.0 <= row.score <= 100.0
    # Every rate-1 row and every full row is the one uncompressed run.
    for key in [("full", 16), ("kvcompress", 1), ("random", 1)]:
        assert by[key].score == by["full", 1].score
        assert by[key].achieved_rate == 1.0
    assert by["kvcompress", 16].achieved_rate > 2
    assert by["random", 16].achieved_rate > 2
    # The pass key is easy for the default model with a full cache.
    assert by["full", 1].score == 100.0
    assert by["full", 16].score >= by["random", 16].score

    assert result.kept is not None and result.kept.rate == 16
    assert set(result.kept.grids) == {"kvcompress", "random"}  # full keeps everything
    grid = result.kept.grids["kvcompress"]
    layers, heads = engine.model_config.num_layers, engine.model_config.num_kv_heads
    assert len(grid) == layers and all(len(row) == heads for row in grid)
    document = json.loads(json.dumps(result.document()))
    assert document["suite"] == "ruler" and len(document["rows"]) == 6
    assert document["config"]["chat"] is True
